#!/usr/bin/env bash
# Regenerates the small seed inputs under fuzz/seeds/ (checked in; about 30 KB in all).
# Needs gcc and binutils. The ELF files are tiny (no libc, no page padding) but real:
# built with -g, a PT_INTERP and RUNPATH into /nix/store, a DT_NEEDED, a soname, and a
# relocatable object with debug sections (what a kernel module looks like to the stripper).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)

# Store hashes the elf_select target's fake store uses (fuzz_targets/elf_select.rs).
LIB=0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd
GLIBC=1b9p07z77phvv2hf6gm9f28syrgkaaf2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/x.c" <<'C'
const char *x(void) { return "x"; }
C
cat >"$work/prog.c" <<C
const char *x(void);
static const char data[] = "/nix/store/$LIB-lib/share/data.txt";
int counter;
void _start(void) { volatile const char *p = x(); (void)p; (void)data; counter++; for (;;) {} }
C
small=(-Os -nostdlib -fno-asynchronous-unwind-tables -Wl,-z,max-page-size=0x1000
  -Wl,-z,noseparate-code -Wl,-z,norelro -Wl,--build-id=none -Wl,--hash-style=gnu)
gcc "${small[@]}" -g -shared -fPIC -Wl,-soname,libx.so.1 -o "$work/libx.so.1" "$work/x.c"
gcc "${small[@]}" -g -fPIE -pie -o "$work/prog" "$work/prog.c" -L"$work" -l:libx.so.1 \
  -Wl,--dynamic-linker=/nix/store/$GLIBC-glibc/lib/ld-linux-x86-64.so.2 \
  -Wl,--enable-new-dtags -Wl,-rpath,/nix/store/$LIB-lib/lib
gcc -Os -g -c -o "$work/module.o" "$work/x.c"

mkdir -p elf_strip elf_select refs_scan config_loader cpio_roundtrip
cp "$work/prog" elf_strip/pie-executable-debug
cp "$work/libx.so.1" elf_strip/shared-library-debug
cp "$work/module.o" elf_strip/relocatable-debug
strip -o elf_strip/pie-executable-stripped "$work/prog"

# elf_select: first byte = flags (see the target), then the file's contents.
{ printf '\0'; cat "$work/prog"; } >elf_select/program
{ printf '\1'; cat "$work/prog"; } >elf_select/program-unstripped
{ printf '\0'; printf '#!/nix/store/%s-glibc/bin/sh\nexec /nix/store/%s-lib/lib/libx.so.1 "$@"\n' "$GLIBC" "$LIB"; } >elf_select/script
{ printf '\2'; printf 'see /nix/store/%s-lib/share/data.txt and /nix/store/%s-lib\n' "$LIB" "$LIB"; } >elf_select/text-drop-rewrite
# The fake store's fixed files.
mkdir -p ../fixtures
cp "$work/libx.so.1" ../fixtures/libx.so.1

printf 'exec /nix/store/%s-lib/bin/x -c /nix/store/%s-glibc/etc:/nix/store/%s\n' "$LIB" "$GLIBC" "$LIB" >refs_scan/script
printf '/nix/store/nix/store/%s-x /nix/store/%s-a.b/c/d.e"' "$LIB" "$GLIBC" >refs_scan/overlap

{ cat "$root/boards/qemu-x86_64.toml"; printf '\0'; cat "$root/profiles/conformance.toml"; } >config_loader/board-and-conformance
{ cat "$root/boards/qemu-x86_64.toml"; printf '\0'; cat "$root/profiles/minimal.toml"; } >config_loader/board-and-minimal

# cpio_roundtrip takes structured input (arbitrary): any bytes will do as a start.
printf 'etc\0passwd\0root:x:0:0::/:/bin/sh\n\0\0\0\0' >cpio_roundtrip/bytes
ls -l elf_strip elf_select refs_scan config_loader cpio_roundtrip ../fixtures
du -sb . ../fixtures
