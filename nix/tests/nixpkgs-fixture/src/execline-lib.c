/* The fixture's libexecline, which links against libskarnet like the real one. */
#include <skalibs/skalibs.h>

int execline_fixture(void)
{
	return skarnet_fixture();
}
