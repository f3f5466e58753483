"""The virtual rig: a simulated Compute Module that the framework drives through the same interfaces as
hardware (gpiozero pins, a serial device, a block device, USB through the real libusb).

Nothing under ``hil/`` outside this package imports it; the command line and the pytest plugin start it
beside the library when a rig file has a ``[virtual]`` section.
"""
