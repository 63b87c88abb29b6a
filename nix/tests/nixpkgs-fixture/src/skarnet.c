/* The fixture's libskarnet: one function, so that programs link against the library. */
#include "skalibs.h"

int skarnet_fixture(void)
{
	return 42;
}
