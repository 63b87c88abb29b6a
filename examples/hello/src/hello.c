/* A team's own program, the worked example of [local-packages]: built with -g, unstripped. */
#include <stdio.h>
#include <string.h>

static int greet(const char *who)
{
	return printf("Hello, %s!\n", who) < 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--version") == 0) {
		puts("hello (bonsai example) 1.0");
		return 0;
	}
	return greet(argc > 1 ? argv[1] : "world");
}
