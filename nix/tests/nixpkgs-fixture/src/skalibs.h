/* The fixture's skalibs header. */
int skarnet_fixture(void);
