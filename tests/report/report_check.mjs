// Opens a rendered Allure report in Debian's chromium the way a person would, and prints what it showed
// as JSON on stdout: the page text at each stop, and every request that left the machine (those are
// blocked, so a closed lab network cannot stall the page). The pytest side decides what must be there.
//
// usage: node report_check.mjs URL SPEC, where SPEC is JSON: {"test", "step", "attachment": names to open in
// turn, "content": text the attachment shows, "categories": {category name: a test expected in it}}
import { createRequire } from "node:module";

const require = createRequire(new URL("../../report/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const [url, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const WAIT_MS = 20_000;
const FIRST_LOAD_MS = 60_000; // a browser's first start on a fresh machine builds its caches (fonts, profile)
const DEADLINE_MS = 200_000; // under the pytest side's 240 s, so that chromium is always closed by us
const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]"]);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
  ],
});
const seen = { outside: [], errors: [], stops: {} };
let closing = false;
browser.on("disconnected", () => closing || seen.errors.push("the browser went away (it crashed)"));
const deadline = setTimeout(async () => {
  process.stderr.write(`gave up after ${DEADLINE_MS} ms: ${JSON.stringify(seen)}\n`);
  closing = true;
  await browser.close();
  process.exit(1);
}, DEADLINE_MS);
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT_MS);
  await page.route("**/*", (route) => {
    const target = new URL(route.request().url());
    const leaves = ["http:", "https:", "ws:", "wss:"].includes(target.protocol) && !LOOPBACK.has(target.hostname);
    if (leaves) {
      seen.outside.push(target.href);
      return route.abort();
    }
    return route.continue();
  });
  page.on("pageerror", (error) => seen.errors.push(String(error)));
  const text = async () => {
    try {
      return await page.locator("body").innerText();
    } catch (error) {
      seen.errors.push(`page text: ${error.message.split("\n")[0]}`);
      return "";
    }
  };
  // Each stop waits for what a person would look for, and records the page either way.
  const stop = async (name, action, expected) => {
    try {
      await action();
      await page.getByText(expected, { exact: false }).first().waitFor({ timeout: WAIT_MS });
    } catch (error) {
      seen.errors.push(`${name}: ${error.message.split("\n")[0]}`);
    }
    seen.stops[name] = await text();
  };

  await stop("home", () => page.goto(url, { timeout: FIRST_LOAD_MS }), spec.test);
  await stop("test", () => page.getByText(spec.test, { exact: true }).first().click(), spec.step);
  await stop("step", () => page.getByText(spec.step, { exact: true }).first().click(), spec.attachment);
  await stop("attachment", () => page.getByText(spec.attachment, { exact: true }).first().click(), spec.content);
  try {
    await page.goto(url);
  } catch (error) {
    seen.errors.push(`back home: ${error.message.split("\n")[0]}`);
  }
  for (const [category, test] of Object.entries(spec.categories)) {
    await stop(`category ${category}`, async () => {
      await page.getByText(/^Categories\s*\d+$/).first().click();
      await page.getByText(category, { exact: true }).first().click();
    }, test);
  }
} finally {
  clearTimeout(deadline);
  closing = true;
  await browser.close();
}
process.stdout.write(JSON.stringify(seen));
