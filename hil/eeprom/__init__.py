"""The CM4/CM5 SPI bootloader EEPROM: its configuration, image container, .sig file and flashing flow."""
