#include <stdio.h>
#ifdef WITH_SYSTEMD
int sd_booted(void);
#endif
int main(void) {
#ifdef WITH_SYSTEMD
    printf("ps (fixture) with systemd: %d\n", sd_booted());
#else
    puts("ps (fixture)");
#endif
    return 0;
}
