/* The fixture's execline programs: each links against libexecline and libskarnet. */
#include <stdio.h>

int execline_fixture(void);
int skarnet_fixture(void);

int main(void)
{
	printf("%s %d %d\n", PROG, execline_fixture(), skarnet_fixture());
	return 0;
}
