"""An amd64 Linux guest under QEMU that runs a program with the virtual module behind the kernel's own USB stack
(dummy_hcd, raw_gadget, configfs mass storage, usb-storage, usbfs, usbmon): the *kernel* USB transport."""
