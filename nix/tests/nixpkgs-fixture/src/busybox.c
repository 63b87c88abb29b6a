/* The fixture's busybox: one multi-call program that answers to every applet name it is
 * linked under (not a shell: fixture images are listed and inspected, never booted). */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	const char *name = strrchr(argv[0], '/');
	name = name ? name + 1 : argv[0];
	if (strcmp(name, "busybox") == 0 && argc > 1 && strcmp(argv[1], "--list") == 0) {
		const char *a = APPLETS, *sp;
		while ((sp = strchr(a, ' ')) != NULL) {
			printf("%.*s\n", (int)(sp - a), a);
			a = sp + 1;
		}
		puts(a);
		return 0;
	}
	printf("fixture busybox: %s\n", name);
	return 0;
}
