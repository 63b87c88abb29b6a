//! `rootfs::strip_bytes` on arbitrary bytes (seeded with small real ELF files: see
//! `fuzz/seeds/elf_strip/`). Never panics; the outcome's sizes match its bytes; anything but
//! `Stripped` returns the input untouched; a `Stripped` file is smaller, still parses with
//! the `object` crate (headers, sections, symbols, dynamic symbols), keeps its program
//! headers (type, address, size), and stripping it again finds nothing more to do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use object::read::elf::{ElfFile32, ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSection, ObjectSymbol};
use rootfs::{strip_bytes, StripAction, StripModules, StripOptions};

/// Parses `data` the way tools do and touches everything stripping rewrites.
fn parse_all(data: &[u8]) -> Result<(), String> {
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    for s in file.sections() {
        s.name().map_err(|e| format!("section name: {e}"))?;
        if s.kind() != object::SectionKind::UninitializedData {
            s.data().map_err(|e| format!("section data: {e}"))?;
        }
    }
    for sym in file.dynamic_symbols() {
        let _ = sym.name();
        let _ = sym.section();
    }
    for sym in file.symbols() {
        let _ = sym.name();
    }
    Ok(())
}

/// (p_type, p_vaddr, p_filesz) of each program header.
fn segments(data: &[u8]) -> Option<Vec<(u32, u64, u64)>> {
    fn of<H: FileHeader<Endian = Endianness>>(data: &[u8]) -> Option<Vec<(u32, u64, u64)>> {
        let h = H::parse(data).ok()?;
        let e = h.endian().ok()?;
        let mut out = Vec::new();
        for p in h.program_headers(e, data).ok()? {
            out.push((p.p_type(e).0, p.p_vaddr(e).into(), p.p_filesz(e).into()));
        }
        Some(out)
    }
    match data.get(4) {
        Some(1) => of::<object::elf::FileHeader32<Endianness>>(data),
        Some(2) => of::<object::elf::FileHeader64<Endianness>>(data),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    for modules in [StripModules::None, StripModules::Debug] {
        let opts = StripOptions { modules };
        let out = strip_bytes(data, &opts);
        assert_eq!(out.before, data.len() as u64);
        assert_eq!(out.after, out.bytes.len() as u64);
        match &out.action {
            StripAction::Stripped => {
                assert!(out.after < out.before, "stripped but not smaller");
                if parse_all(data).is_err() {
                    // Only judge outputs of inputs that tools could read in the first place.
                    continue;
                }
                if let Err(e) = parse_all(&out.bytes) {
                    panic!(
                        "stripped output does not parse with object: {e} ({:?})",
                        out.kind
                    );
                }
                // The loadable image keeps its shape: same program headers (type, address,
                // file size) in the same order.
                match (segments(data), segments(&out.bytes)) {
                    (Some(before), Some(after)) => {
                        assert_eq!(before, after, "program headers changed")
                    }
                    (Some(_), None) => panic!("program headers of the output are unreadable"),
                    _ => {}
                }
                // Idempotent: nothing left to strip.
                let again = strip_bytes(&out.bytes, &opts);
                assert!(
                    !matches!(again.action, StripAction::Stripped),
                    "a second strip removed {} more bytes",
                    out.after - again.after
                );
            }
            _ => assert!(out.bytes == data, "{:?} but the bytes changed", out.action),
        }
        // Typed access for the 32/64-bit classes must not panic either.
        let _ = ElfFile32::<Endianness>::parse(&*out.bytes);
        let _ = ElfFile64::<Endianness>::parse(&*out.bytes);
    }
});
