// Opens a rendered Allure report in Debian's chromium the way a person would, and prints what it showed
// as JSON on stdout: the page text at each stop, and every request that left the machine (those are
// blocked, so a closed lab network cannot stall the page). The pytest side decides what must be there.
//
// usage: node report_check.mjs SPEC, where SPEC is JSON: {"stops": [{"name", "goto", "click", "expect"}, ...]}.
// At each stop the page first loads "goto" (a URL, optional: a test's own page is index.html#<its id>), then
// clicks each of "click" in turn (a text, matched whole, or {"regex": pattern} for the first text it matches),
// then waits for the text "expect" to show.
import { createRequire } from "node:module";

const require = createRequire(new URL("../../report/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const spec = JSON.parse(process.argv[2]);
const WAIT_MS = 20_000;
const LOAD_MS = 60_000; // a browser's first start on a fresh machine builds its caches (fonts, profile)
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
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
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
  const target = (click) => (typeof click === "string"
    ? page.getByText(click, { exact: true }) : page.getByText(new RegExp(click.regex))).first();
  // Each stop waits for what a person would look for, and records the page either way.
  for (const stop of spec.stops) {
    try {
      if (stop.goto) {
        await page.goto(stop.goto, { timeout: LOAD_MS });
      }
      for (const click of stop.click ?? []) {
        await target(click).click();
      }
      await page.getByText(stop.expect, { exact: false }).first().waitFor({ timeout: WAIT_MS });
    } catch (error) {
      seen.errors.push(`${stop.name}: ${error.message.split("\n")[0]}`);
    }
    seen.stops[stop.name] = await text();
  }
} finally {
  clearTimeout(deadline);
  closing = true;
  await browser.close();
}
process.stdout.write(JSON.stringify(seen));
