int sd_booted(void) { return 0; }
