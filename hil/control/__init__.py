"""The control layer: what drives a rig's hardware (relays, power, boot mode, console, boot confirmation,
host controller identity) and the lifecycle that moves its module between states."""
