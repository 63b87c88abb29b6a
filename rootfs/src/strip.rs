//! Stripping ELF files in process, by file type.
//!
//! - Executables (ET_EXEC, and ET_DYN with PT_INTERP) and shared libraries (ET_DYN without)
//!   lose `.symtab`, its `.strtab`, debug sections (`.debug*`, `.zdebug*`, `.gnu.debuglto_*`,
//!   `.line`, `.stab*`, `.gdb_index`) and non-allocated relocations against them: what
//!   binutils' `strip --strip-all` removes. `.dynsym` is allocated and never touched, so
//!   shared libraries keep their dynamic symbols. Like binutils, `.comment` and
//!   `.gnu_debuglink` stay.
//! - Relocatable objects (ET_REL: kernel modules) are left byte-identical by default; with
//!   `strip-modules = "debug"` they lose debug sections only (symbols and relocations stay).
//! - Anything else, or anything that does not parse, is left byte-identical, and the outcome
//!   says why.
//!
//! How: the loadable image is never rewritten. Everything a program header covers (plus the
//! ELF header, the program headers and every allocated section) is grouped into chunks of
//! contiguous bytes; chunks are copied in order, each moved down as far as its segments'
//! alignment allows (file offset stays congruent to the address); the kept non-allocated
//! sections follow, then a fresh section name table and the section headers. Section
//! indices are renumbered in `sh_link`/`sh_info`, in `.dynsym`'s `st_shndx` (and `.symtab`'s
//! and section groups' for ET_REL). A result that is not smaller than the input, or that
//! does not parse back (with our reader, and with the `object` crate's whenever it reads the
//! input), is discarded in favour of the input.

use std::borrow::Cow;
use std::ops::Range;

use serde::Serialize;

use crate::elf::{self, ElfFile, ElfKind, Section};
use crate::policy::StripModules;

/// Settings for [`strip_bytes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StripOptions {
    /// What happens to relocatable objects (kernel modules).
    pub modules: StripModules,
}

/// What [`strip_bytes`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action", content = "reason")]
pub enum StripAction {
    /// Sections were removed; `bytes` is the new file.
    Stripped,
    /// An ELF file with nothing to remove (or left alone by policy); `bytes` is the input.
    Unchanged,
    /// Not an ELF file; `bytes` is the input.
    NotElf,
    /// The file looks like ELF but could not be stripped safely; `bytes` is the input.
    Failed(String),
}

/// The result of [`strip_bytes`].
#[derive(Clone, Debug)]
pub struct StripOutcome<'a> {
    /// The output file: borrowed from the input unless the action is `Stripped`.
    pub bytes: Cow<'a, [u8]>,
    /// Input size.
    pub before: u64,
    /// Output size.
    pub after: u64,
    pub action: StripAction,
    /// The ELF file type, when the header parsed.
    pub kind: Option<ElfKind>,
}

/// Strips `data` according to its ELF type and `opts`. Never panics: any input yields an
/// outcome, and on any doubt the input is returned unchanged.
pub fn strip_bytes<'a>(data: &'a [u8], opts: &StripOptions) -> StripOutcome<'a> {
    let same = |action: StripAction, kind: Option<ElfKind>| StripOutcome {
        bytes: Cow::Borrowed(data),
        before: data.len() as u64,
        after: data.len() as u64,
        action,
        kind,
    };
    if !elf::is_elf(data) {
        return same(StripAction::NotElf, None);
    }
    let file = match elf::parse(data) {
        Ok(f) => f,
        Err(e) => return same(StripAction::Failed(e), None),
    };
    let kind = file.kind();
    let removed = plan(&file, opts);
    if !removed.iter().any(|r| *r) {
        return same(StripAction::Unchanged, Some(kind));
    }
    if let Some(reason) = odd_null_section(&file)
        .or_else(|| dangling_link(&file, &removed))
        .or_else(|| odd_name_table(&file, &removed))
    {
        return same(StripAction::Failed(reason), Some(kind));
    }
    let result = match kind {
        ElfKind::Relocatable => rewrite_relocatable(&file, data, &removed),
        _ => rewrite_linked(&file, data, &removed),
    };
    match result {
        Ok(out) if out.len() < data.len() => match elf::parse(&out) {
            Ok(check) if check.segments.len() == file.segments.len() => {
                if let Err(e) = reads_back(&out) {
                    if reads_back(data).is_ok() {
                        return same(
                            StripAction::Failed(format!(
                                "the stripped file would not read back: {e}"
                            )),
                            Some(kind),
                        );
                    }
                }
                StripOutcome {
                    before: data.len() as u64,
                    after: out.len() as u64,
                    bytes: Cow::Owned(out),
                    action: StripAction::Stripped,
                    kind: Some(kind),
                }
            }
            Ok(_) => same(
                StripAction::Failed("output lost program headers".into()),
                Some(kind),
            ),
            Err(e) => same(
                StripAction::Failed(format!("output does not parse: {e}")),
                Some(kind),
            ),
        },
        Ok(_) => same(StripAction::Unchanged, Some(kind)),
        Err(e) => same(StripAction::Failed(e), Some(kind)),
    }
}

/// Reads `data` the way tools built on the `object` crate do: the file (its section table,
/// symbol tables and relocation sections), then every section's name and contents. A stripped
/// output must read back whenever its input did: stripping removes sections, and a reader that
/// takes the first section of a type (the symbol table, say) may then meet a malformed one
/// that the removed section had hidden.
fn reads_back(data: &[u8]) -> std::result::Result<(), String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    for s in file.sections() {
        s.name().map_err(|e| format!("section name: {e}"))?;
        if s.kind() != object::SectionKind::UninitializedData {
            s.data().map_err(|e| format!("section data: {e}"))?;
        }
    }
    Ok(())
}

/// File ranges of the sections that stripping removes from this file: the reference
/// scanner skips them, since they will not be in the image.
pub(crate) fn removed_ranges(file: &ElfFile, opts: &StripOptions) -> Vec<Range<usize>> {
    plan(file, opts)
        .iter()
        .zip(&file.sections)
        .filter(|(r, _)| **r)
        .filter_map(|(_, s)| s.file_range())
        .collect()
}

fn is_debug_name(name: &[u8]) -> bool {
    name.starts_with(b".debug")
        || name.starts_with(b".zdebug")
        || name.starts_with(b".gnu.debuglto_")
        || name.starts_with(b".gnu.linkonce.wi.")
        || name.starts_with(b".stab")
        || name == b".line"
        || name == b".gdb_index"
}

/// Which sections go, by index.
fn plan(file: &ElfFile, opts: &StripOptions) -> Vec<bool> {
    let kind = file.kind();
    let n = file.sections.len();
    let mut removed = vec![false; n];
    let strip_symbols = match kind {
        ElfKind::Executable | ElfKind::SharedLibrary => true,
        ElfKind::Relocatable if opts.modules == StripModules::Debug => false,
        _ => return removed,
    };
    let protected = |i: usize, s: &Section| i == 0 || Some(i) == file.shstrndx || s.is_alloc();
    for (i, s) in file.sections.iter().enumerate() {
        if protected(i, s) {
            continue;
        }
        if is_debug_name(&s.name)
            || (strip_symbols && matches!(s.sh_type, elf::SHT_SYMTAB | elf::SHT_SYMTAB_SHNDX))
        {
            removed[i] = true;
        }
    }
    let gone = |removed: &[bool], index: u32| removed.get(index as usize).copied().unwrap_or(false);
    loop {
        let mut changed = false;
        for (i, s) in file.sections.iter().enumerate() {
            if removed[i] || protected(i, s) {
                continue;
            }
            let go = match s.sh_type {
                elf::SHT_REL | elf::SHT_RELA | elf::SHT_CREL => {
                    (s.sh_info != 0 && gone(&removed, s.sh_info))
                        || (s.sh_link != 0 && gone(&removed, s.sh_link))
                }
                elf::SHT_SYMTAB_SHNDX => gone(&removed, s.sh_link),
                elf::SHT_STRTAB => {
                    let linkers: Vec<usize> = file
                        .sections
                        .iter()
                        .enumerate()
                        .filter(|(j, o)| *j != i && o.sh_link as usize == i)
                        .map(|(j, _)| j)
                        .collect();
                    if linkers.is_empty() {
                        strip_symbols && s.name == b".strtab"
                    } else {
                        linkers.iter().all(|j| removed[*j])
                    }
                }
                _ => false,
            };
            if go {
                removed[i] = true;
                changed = true;
            }
        }
        if !changed {
            return removed;
        }
    }
}

/// Old section index → new one, `None` for removed sections.
fn index_map(removed: &[bool]) -> Vec<Option<u32>> {
    let mut next = 0u32;
    removed
        .iter()
        .map(|r| {
            if *r {
                None
            } else {
                next += 1;
                Some(next - 1)
            }
        })
        .collect()
}

/// Little helper for writing header fields in the file's byte order and class.
struct Enc {
    is_64: bool,
    little: bool,
}

impl Enc {
    fn put(&self, out: &mut [u8], off: usize, value: u64, size: usize) -> Result<(), String> {
        let slot = off
            .checked_add(size)
            .and_then(|end| out.get_mut(off..end))
            .ok_or_else(|| format!("write at {off:#x} is out of bounds"))?;
        let bytes = value.to_le_bytes();
        if size < 8 && value >> (size * 8) != 0 {
            return Err(format!("value {value:#x} does not fit {size} bytes"));
        }
        for i in 0..size {
            let b = bytes[i];
            if self.little {
                slot[i] = b;
            } else {
                slot[size - 1 - i] = b;
            }
        }
        Ok(())
    }

    fn word(&self) -> usize {
        if self.is_64 {
            8
        } else {
            4
        }
    }

    fn put_word(&self, out: &mut [u8], off: usize, value: u64) -> Result<(), String> {
        self.put(out, off, value, self.word())
    }

    fn shentsize(&self) -> usize {
        if self.is_64 {
            64
        } else {
            40
        }
    }

    fn phentsize(&self) -> usize {
        if self.is_64 {
            56
        } else {
            32
        }
    }

    fn symsize(&self) -> usize {
        if self.is_64 {
            24
        } else {
            16
        }
    }

    /// Offset of `st_shndx` in a symbol, and of `st_value`.
    fn sym_shndx(&self) -> usize {
        if self.is_64 {
            6
        } else {
            14
        }
    }

    fn sym_value(&self) -> usize {
        if self.is_64 {
            8
        } else {
            4
        }
    }

    fn section_header(&self, s: &Section, name: u32) -> Result<Vec<u8>, String> {
        let mut h = vec![0u8; self.shentsize()];
        self.put(&mut h, 0, name.into(), 4)?;
        self.put(&mut h, 4, s.sh_type.into(), 4)?;
        if self.is_64 {
            self.put(&mut h, 8, s.sh_flags, 8)?;
            self.put(&mut h, 16, s.sh_addr, 8)?;
            self.put(&mut h, 24, s.sh_offset, 8)?;
            self.put(&mut h, 32, s.sh_size, 8)?;
            self.put(&mut h, 40, s.sh_link.into(), 4)?;
            self.put(&mut h, 44, s.sh_info.into(), 4)?;
            self.put(&mut h, 48, s.sh_addralign, 8)?;
            self.put(&mut h, 56, s.sh_entsize, 8)?;
        } else {
            self.put(&mut h, 8, s.sh_flags, 4)?;
            self.put(&mut h, 12, s.sh_addr, 4)?;
            self.put(&mut h, 16, s.sh_offset, 4)?;
            self.put(&mut h, 20, s.sh_size, 4)?;
            self.put(&mut h, 24, s.sh_link.into(), 4)?;
            self.put(&mut h, 28, s.sh_info.into(), 4)?;
            self.put(&mut h, 32, s.sh_addralign, 4)?;
            self.put(&mut h, 36, s.sh_entsize, 4)?;
        }
        Ok(h)
    }

    /// Patches e_phoff, e_shoff, e_shnum, e_shstrndx.
    fn file_header(
        &self,
        out: &mut [u8],
        phoff: u64,
        shoff: u64,
        shnum: u32,
        shstrndx: u32,
    ) -> Result<(), String> {
        let shnum = u16::try_from(shnum).map_err(|_| "too many sections".to_string())?;
        let shstrndx = u16::try_from(shstrndx)
            .ok()
            .filter(|i| u32::from(*i) < elf::SHN_LORESERVE)
            .ok_or("section name table index too large")?;
        if self.is_64 {
            self.put(out, 32, phoff, 8)?;
            self.put(out, 40, shoff, 8)?;
            self.put(out, 60, shnum.into(), 2)?;
            self.put(out, 62, shstrndx.into(), 2)?;
        } else {
            self.put(out, 28, phoff, 4)?;
            self.put(out, 32, shoff, 4)?;
            self.put(out, 48, shnum.into(), 2)?;
            self.put(out, 50, shstrndx.into(), 2)?;
        }
        Ok(())
    }
}

/// A new section name table: each distinct name once, a name that ends another one shares
/// its tail (`.plt` inside `.rela.plt`), as binutils does.
fn name_table(sections: &[&Section]) -> (Vec<u8>, Vec<u32>) {
    let mut distinct: Vec<&[u8]> = sections
        .iter()
        .map(|s| &s.name[..])
        .filter(|n| !n.is_empty())
        .collect();
    distinct.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    distinct.dedup();
    let mut table = vec![0u8];
    let mut placed: Vec<(&[u8], u32)> = Vec::with_capacity(distinct.len());
    for name in distinct {
        let shared = placed
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(p, off)| off + (p.len() - name.len()) as u32);
        let off = match shared {
            Some(off) => off,
            None => {
                let off = table.len() as u32;
                table.extend_from_slice(name);
                table.push(0);
                off
            }
        };
        placed.push((name, off));
    }
    let offsets = sections
        .iter()
        .map(|s| {
            placed
                .iter()
                .find(|(p, _)| *p == &s.name[..])
                .map_or(0, |(_, off)| *off)
        })
        .collect();
    (table, offsets)
}

fn align_to(v: u64, align: u64) -> Result<u64, String> {
    if align <= 1 {
        return Ok(v);
    }
    if !align.is_power_of_two() {
        return Err(format!("alignment {align:#x} is not a power of two"));
    }
    v.checked_add(align - 1)
        .map(|x| x & !(align - 1))
        .ok_or_else(|| "offset overflow".to_string())
}

fn checked_end(start: u64, size: u64, len: u64, what: &str) -> Result<u64, String> {
    match start.checked_add(size) {
        Some(end) if end <= len => Ok(end),
        _ => Err(format!(
            "{what} at {start:#x}+{size:#x} is beyond the end of the file"
        )),
    }
}

/// A kept section whose `sh_link` (or `sh_info`, when it holds an index) names a section
/// that does not exist: renumbering cannot keep such a link meaning anything (it would
/// become 0 and point at, say, the symbol table), so the file is left alone.
fn dangling_link(file: &ElfFile, removed: &[bool]) -> Option<String> {
    let n = file.sections.len();
    file.sections
        .iter()
        .enumerate()
        .filter(|(i, _)| !removed[*i])
        .find_map(|(i, s)| {
            let bad = if s.sh_link as usize >= n {
                Some(("sh_link", s.sh_link))
            } else if s.info_is_section() && s.sh_info as usize >= n {
                Some(("sh_info", s.sh_info))
            } else {
                None
            };
            bad.map(|(field, to)| {
                format!(
                    "section {i} ({}) has {field} {to}, but there are only {n} sections",
                    s.name_str()
                )
            })
        })
}

/// Section 0 must be `SHT_NULL`. Tools that look for the first section of a type (the dynamic
/// symbol table, say) also look at section 0, so one of another type can hide a broken section
/// of the same type behind it; writing section 0 as a null section would then bring that one
/// to light (found by the elf_strip fuzz target). Such a file is left alone.
fn odd_null_section(file: &ElfFile) -> Option<String> {
    let first = file.sections.first()?;
    (first.sh_type != elf::SHT_NULL)
        .then(|| format!("section 0 is of type {:#x}, not SHT_NULL", first.sh_type))
}

/// The section name table is rewritten from scratch, so it must be a table of its own: a
/// non-allocated `SHT_STRTAB` that no kept section links to (a `.symtab` sharing it goes
/// anyway). When `e_shstrndx` names anything else (a symbol table, `.dynstr`, a loaded
/// section), replacing its bytes would change what that section means, so the file is left
/// alone.
fn odd_name_table(file: &ElfFile, removed: &[bool]) -> Option<String> {
    let i = file.shstrndx?;
    let s = file.sections.get(i)?;
    let why = if s.sh_type != elf::SHT_STRTAB {
        format!("is of type {:#x}, not a string table", s.sh_type)
    } else if s.is_alloc() {
        "is loaded at run time".to_string()
    } else if let Some(j) = (0..file.sections.len())
        .find(|j| *j != i && !removed[*j] && file.sections[*j].sh_link as usize == i)
    {
        format!("is also linked from section {j}")
    } else {
        return None;
    };
    Some(format!(
        "the section name table (section {i}, {}) {why}",
        s.name_str()
    ))
}

/// Section 0 as the output has it: `SHT_NULL` and all zero, as the ELF specification wants;
/// only `sh_info` stays when it holds the real program header count (`e_phnum` = `PN_XNUM`).
/// Found by the elf_strip fuzz target: a section 0 copied verbatim kept whatever type and
/// `sh_info` it had, and claimed to be a relocation section whose target no longer existed.
fn null_section(file: &ElfFile) -> Section {
    let phnum_extended = file.segments.len() >= usize::from(elf::PN_XNUM);
    Section {
        name: Vec::new(),
        sh_type: elf::SHT_NULL,
        sh_flags: 0,
        sh_addr: 0,
        sh_offset: 0,
        sh_size: 0,
        sh_link: 0,
        sh_info: match file.sections.first() {
            Some(s) if phnum_extended => s.sh_info,
            _ => 0,
        },
        sh_addralign: 0,
        sh_entsize: 0,
    }
}

/// The headers of the kept sections, renumbered, with section 0 a plain null section.
fn kept_headers(file: &ElfFile, kept: &[usize], map: &[Option<u32>]) -> Vec<Section> {
    let mut headers: Vec<Section> = kept
        .iter()
        .map(|i| relink(&file.sections[*i], map))
        .collect();
    if let Some(first) = headers.first_mut() {
        *first = null_section(file);
    }
    headers
}

/// Renumbers sh_link / sh_info; a link to a removed section becomes 0.
fn relink(s: &Section, map: &[Option<u32>]) -> Section {
    let mut s = s.clone();
    let remap = |i: u32| map.get(i as usize).copied().flatten().unwrap_or(0);
    s.sh_link = remap(s.sh_link);
    if s.info_is_section() {
        s.sh_info = remap(s.sh_info);
    }
    s
}

/// Renumbers `st_shndx` in a symbol table at `range` of `out`; with `value_too`, symbols of
/// removed sections become absolute with value 0 (else they are left alone).
fn remap_symbols(
    enc: &Enc,
    out: &mut [u8],
    range: Range<usize>,
    entsize: usize,
    map: &[Option<u32>],
    value_too: bool,
) -> Result<(), String> {
    let little = enc.little;
    let mut off = range.start;
    while off + entsize <= range.end {
        let at = off + enc.sym_shndx();
        let raw = out.get(at..at + 2).ok_or("symbol table out of bounds")?;
        let shndx = if little {
            u16::from_le_bytes([raw[0], raw[1]])
        } else {
            u16::from_be_bytes([raw[0], raw[1]])
        };
        if shndx != 0 && u32::from(shndx) < elf::SHN_LORESERVE {
            match map.get(usize::from(shndx)).copied().flatten() {
                Some(new) if new < elf::SHN_LORESERVE => enc.put(out, at, new.into(), 2)?,
                Some(_) => return Err("section index does not fit a symbol".into()),
                None if value_too => {
                    enc.put(out, at, elf::SHN_ABS.into(), 2)?;
                    enc.put_word(out, off + enc.sym_value(), 0)?;
                }
                None => {}
            }
        }
        off += entsize;
    }
    Ok(())
}

struct Chunk {
    start: u64,
    end: u64,
    align: u64,
    new_start: u64,
}

impl Chunk {
    fn map(&self, off: u64) -> u64 {
        off - self.start + self.new_start
    }
}

/// Maps an old file offset to the new one: inside (or at the end of) a chunk it moves with
/// the chunk; in a gap it goes to the end of the chunk before.
fn map_offset(chunks: &[Chunk], off: u64) -> u64 {
    if let Some(c) = chunks.iter().find(|c| c.start <= off && off <= c.end) {
        return c.map(off);
    }
    match chunks.iter().rev().find(|c| c.end < off) {
        Some(c) => c.map(c.end),
        None => off,
    }
}

fn rewrite_linked(file: &ElfFile, data: &[u8], removed: &[bool]) -> Result<Vec<u8>, String> {
    if file.extended_numbering {
        return Err("extended section numbering is not supported".into());
    }
    let enc = Enc {
        is_64: file.is_64,
        little: file.little,
    };
    let len = data.len() as u64;
    let shstrndx = file.shstrndx.ok_or("no section name table")?;

    // Blocks that must move as a unit: headers, segments, allocated sections.
    let header_end = checked_end(0, u64::from(file.ehsize), len, "ELF header")?;
    let mut blocks: Vec<(u64, u64, u64)> = vec![(0, header_end, 1)];
    if !file.segments.is_empty() {
        let size = (file.segments.len() * enc.phentsize()) as u64;
        blocks.push((
            file.phoff,
            checked_end(file.phoff, size, len, "program headers")?,
            1,
        ));
    }
    for seg in &file.segments {
        let end = checked_end(seg.p_offset, seg.p_filesz, len, "segment")?;
        let align = if seg.p_align.is_power_of_two() {
            seg.p_align
        } else {
            1
        };
        if seg.p_filesz > 0 {
            blocks.push((seg.p_offset, end, align));
        }
    }
    for (i, s) in file.sections.iter().enumerate() {
        if s.sh_type == elf::SHT_NOBITS || s.sh_size == 0 {
            continue;
        }
        let end = checked_end(s.sh_offset, s.sh_size, len, "section")?;
        if s.is_alloc() && !removed[i] {
            let align = if s.sh_addralign.is_power_of_two() {
                s.sh_addralign
            } else {
                1
            };
            blocks.push((s.sh_offset, end, align));
        }
    }
    blocks.sort_unstable();
    let mut chunks: Vec<Chunk> = Vec::new();
    for (start, end, align) in blocks {
        match chunks.last_mut() {
            Some(c) if start <= c.end => {
                c.end = c.end.max(end);
                c.align = c.align.max(align);
            }
            _ => chunks.push(Chunk {
                start,
                end,
                align,
                new_start: 0,
            }),
        }
    }
    let mut cursor = 0u64;
    for c in &mut chunks {
        c.new_start = if c.start == 0 {
            0
        } else {
            cursor + (c.start - cursor) % c.align.max(1)
        };
        cursor = c.new_start + (c.end - c.start);
    }

    let mut out = Vec::with_capacity(data.len());
    for c in &chunks {
        out.resize(c.new_start as usize, 0);
        out.extend_from_slice(&data[c.start as usize..c.end as usize]);
    }

    let map = index_map(removed);
    let kept: Vec<usize> = (0..file.sections.len()).filter(|i| !removed[*i]).collect();
    let mut new_sections = kept_headers(file, &kept, &map);

    // Offsets of kept sections: inside chunks they move with them; the rest is appended.
    let mut appended: Vec<usize> = Vec::new();
    for (k, &i) in kept.iter().enumerate() {
        let s = &file.sections[i];
        if i == 0 || i == shstrndx {
            continue;
        }
        let inside = chunks
            .iter()
            .find(|c| c.start <= s.sh_offset && s.sh_offset <= c.end);
        match inside {
            Some(c)
                if s.sh_type == elf::SHT_NOBITS
                    || s.sh_offset.saturating_add(s.sh_size) <= c.end =>
            {
                new_sections[k].sh_offset = c.map(s.sh_offset);
            }
            Some(_) if s.is_alloc() => return Err("allocated section straddles a chunk".into()),
            _ if s.sh_type == elf::SHT_NOBITS || (s.sh_size == 0 && s.is_alloc()) => {
                new_sections[k].sh_offset = map_offset(&chunks, s.sh_offset)
            }
            _ => appended.push(k),
        }
    }
    appended.sort_by_key(|k| file.sections[kept[*k]].sh_offset);
    for k in appended {
        let s = &file.sections[kept[k]];
        let bytes = s
            .file_range()
            .and_then(|r| data.get(r))
            .ok_or("section out of bounds")?;
        let align = s.sh_addralign.clamp(1, 64);
        let at = align_to(
            out.len() as u64,
            if align.is_power_of_two() { align } else { 1 },
        )?;
        out.resize(at as usize, 0);
        out.extend_from_slice(bytes);
        new_sections[k].sh_offset = at;
    }

    // The section name table, then the section headers.
    let refs: Vec<&Section> = new_sections.iter().collect();
    let (names, name_offsets) = name_table(&refs);
    let new_shstrndx = map[shstrndx].ok_or("section name table removed")?;
    let sh = &mut new_sections[new_shstrndx as usize];
    sh.sh_offset = out.len() as u64;
    sh.sh_size = names.len() as u64;
    out.extend_from_slice(&names);
    let shoff = align_to(out.len() as u64, enc.word() as u64)?;
    out.resize(shoff as usize, 0);
    for (s, name) in new_sections.iter().zip(&name_offsets) {
        out.extend_from_slice(&enc.section_header(s, *name)?);
    }

    // Program headers: same bytes, new offsets.
    let phoff = if file.segments.is_empty() {
        file.phoff
    } else {
        map_offset(&chunks, file.phoff)
    };
    for (n, seg) in file.segments.iter().enumerate() {
        let at = phoff as usize + n * enc.phentsize() + if file.is_64 { 8 } else { 4 };
        enc.put_word(&mut out, at, map_offset(&chunks, seg.p_offset))?;
    }
    enc.file_header(
        &mut out,
        phoff,
        shoff,
        new_sections.len() as u32,
        new_shstrndx,
    )?;

    // .dynsym's section indices follow the renumbering (the loader ignores them, tools don't).
    for s in &new_sections {
        if s.sh_type == elf::SHT_DYNSYM && s.sh_size > 0 {
            let entsize = if s.sh_entsize as usize == enc.symsize() {
                enc.symsize()
            } else {
                return Err("unexpected .dynsym entry size".into());
            };
            let start = s.sh_offset as usize;
            let end = start
                .checked_add(s.sh_size as usize)
                .filter(|e| *e <= out.len())
                .ok_or(".dynsym out of bounds")?;
            remap_symbols(&enc, &mut out, start..end, entsize, &map, false)?;
        }
    }
    Ok(out)
}

fn rewrite_relocatable(file: &ElfFile, data: &[u8], removed: &[bool]) -> Result<Vec<u8>, String> {
    if file.extended_numbering {
        return Err("extended section numbering is not supported".into());
    }
    if !file.segments.is_empty() {
        return Err("relocatable file with program headers".into());
    }
    let enc = Enc {
        is_64: file.is_64,
        little: file.little,
    };
    let shstrndx = file.shstrndx.ok_or("no section name table")?;
    let map = index_map(removed);
    let kept: Vec<usize> = (0..file.sections.len()).filter(|i| !removed[*i]).collect();
    if kept
        .iter()
        .any(|i| file.sections[*i].sh_type == elf::SHT_SYMTAB_SHNDX)
    {
        return Err("extended symbol section indices are not supported".into());
    }
    let mut new_sections = kept_headers(file, &kept, &map);
    let ehsize = usize::from(file.ehsize);
    let mut out = data.get(..ehsize).ok_or("truncated header")?.to_vec();

    let mut order: Vec<usize> = (1..kept.len()).filter(|k| kept[*k] != shstrndx).collect();
    order.sort_by_key(|k| file.sections[kept[*k]].sh_offset);
    for k in order {
        let s = &file.sections[kept[k]];
        let align = s.sh_addralign.clamp(1, 4096);
        let align = if align.is_power_of_two() { align } else { 1 };
        let at = align_to(out.len() as u64, align)?;
        if s.sh_type == elf::SHT_NOBITS {
            new_sections[k].sh_offset = at;
            continue;
        }
        let range = s
            .file_range()
            .filter(|r| r.end <= data.len())
            .ok_or_else(|| format!("section {} is beyond the end of the file", s.name_str()))?;
        out.resize(at as usize, 0);
        if s.sh_type == elf::SHT_GROUP {
            // Flag word, then member section indices: renumber, drop removed members.
            let words: Vec<u32> = data[range]
                .chunks_exact(4)
                .map(|w| {
                    let b = [w[0], w[1], w[2], w[3]];
                    if enc.little {
                        u32::from_le_bytes(b)
                    } else {
                        u32::from_be_bytes(b)
                    }
                })
                .collect();
            let mut group = Vec::new();
            for (n, w) in words.iter().enumerate() {
                let v = if n == 0 {
                    Some(*w)
                } else {
                    map.get(*w as usize).copied().flatten()
                };
                if let Some(v) = v {
                    let mut b = [0u8; 4];
                    enc.put(&mut b, 0, v.into(), 4)?;
                    group.extend_from_slice(&b);
                }
            }
            new_sections[k].sh_size = group.len() as u64;
            out.extend_from_slice(&group);
        } else {
            out.extend_from_slice(&data[range]);
        }
        new_sections[k].sh_offset = at;
    }

    let refs: Vec<&Section> = new_sections.iter().collect();
    let (names, name_offsets) = name_table(&refs);
    let new_shstrndx = map[shstrndx].ok_or("section name table removed")?;
    let sh = &mut new_sections[new_shstrndx as usize];
    sh.sh_offset = out.len() as u64;
    sh.sh_size = names.len() as u64;
    out.extend_from_slice(&names);
    let shoff = align_to(out.len() as u64, enc.word() as u64)?;
    out.resize(shoff as usize, 0);
    for (s, name) in new_sections.iter().zip(&name_offsets) {
        out.extend_from_slice(&enc.section_header(s, *name)?);
    }
    enc.file_header(&mut out, 0, shoff, new_sections.len() as u32, new_shstrndx)?;

    for s in &new_sections {
        if s.sh_type == elf::SHT_SYMTAB && s.sh_size > 0 {
            if s.sh_entsize as usize != enc.symsize() {
                return Err("unexpected .symtab entry size".into());
            }
            let start = s.sh_offset as usize;
            let end = start
                .checked_add(s.sh_size as usize)
                .filter(|e| *e <= out.len())
                .ok_or(".symtab out of bounds")?;
            remap_symbols(&enc, &mut out, start..end, enc.symsize(), &map, true)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_and_garbage_are_left_alone() {
        let opts = StripOptions::default();
        let out = strip_bytes(b"#!/bin/sh\necho hi\n", &opts);
        assert_eq!(out.action, StripAction::NotElf);
        assert_eq!(out.before, out.after);
        let out = strip_bytes(b"\x7fELF\x02\x01\x01\x00garbage", &opts);
        assert!(
            matches!(out.action, StripAction::Failed(_)),
            "{:?}",
            out.action
        );
        assert_eq!(&*out.bytes, b"\x7fELF\x02\x01\x01\x00garbage");
    }

    /// A 64-bit little-endian ET_EXEC with no segments and sections: null, `.symtab`,
    /// `.rela.x` (its sh_link given), `.shstrtab`.
    fn tiny_exec(rela_link: u32) -> Vec<u8> {
        tiny_exec_names_in(rela_link, 3)
    }

    /// [`tiny_exec`] with `e_shstrndx` set to `shstrndx`.
    fn tiny_exec_names_in(rela_link: u32, shstrndx: u16) -> Vec<u8> {
        let names = b"\0.symtab\0.rela.x\0.shstrtab\0";
        let mut out = vec![0u8; 64];
        out[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        out[16..18].copy_from_slice(&elf::ET_EXEC.to_le_bytes());
        out[18..20].copy_from_slice(&62u16.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[58..60].copy_from_slice(&64u16.to_le_bytes());
        out[60..62].copy_from_slice(&4u16.to_le_bytes());
        out[62..64].copy_from_slice(&shstrndx.to_le_bytes());
        let symtab = out.len() as u64;
        out.extend([0u8; 48]);
        let rela = out.len() as u64;
        out.extend([0u8; 24]);
        let strings = out.len() as u64;
        out.extend(names);
        out.resize(out.len().next_multiple_of(8), 0);
        let shoff = out.len() as u64;
        out[40..48].copy_from_slice(&shoff.to_le_bytes());
        let enc = Enc {
            is_64: true,
            little: true,
        };
        let section = |name: u32, sh_type: u32, off: u64, size: u64, link: u32, entsize: u64| {
            let s = Section {
                name: Vec::new(),
                sh_type,
                sh_flags: 0,
                sh_addr: 0,
                sh_offset: off,
                sh_size: size,
                sh_link: link,
                sh_info: 0,
                sh_addralign: 1,
                sh_entsize: entsize,
            };
            enc.section_header(&s, name).unwrap()
        };
        out.extend(section(0, 0, 0, 0, 0, 0));
        out.extend(section(1, elf::SHT_SYMTAB, symtab, 48, 3, 24));
        out.extend(section(9, elf::SHT_RELA, rela, 24, rela_link, 24));
        out.extend(section(
            17,
            elf::SHT_STRTAB,
            strings,
            names.len() as u64,
            0,
            0,
        ));
        out
    }

    /// Found by the elf_strip fuzz target: a kept section linking to a section index that
    /// does not exist had its link renumbered to 0, so the output said something the input
    /// did not (object then rejected the relocations). Such a file is left alone now.
    #[test]
    fn a_link_to_a_missing_section_leaves_the_file_alone() {
        let opts = StripOptions::default();
        let good = tiny_exec(1);
        let out = strip_bytes(&good, &opts);
        assert_eq!(out.action, StripAction::Stripped, "{:?}", out.action);
        assert!(out.after < out.before);
        assert_left_alone(
            &tiny_exec(99),
            "section 2 (.rela.x) has sh_link 99, but there are only 4 sections",
        );
    }

    /// `strip_bytes` refuses `bad` for `reason` and returns it byte for byte.
    fn assert_left_alone(bad: &[u8], reason: &str) {
        let out = strip_bytes(bad, &StripOptions::default());
        assert_eq!(out.action, StripAction::Failed(reason.into()));
        assert_eq!(&*out.bytes, bad);
    }

    /// Found by the elf_strip fuzz target (in CI): `e_shstrndx` named a symbol table, whose
    /// bytes were then replaced by the new name table, so the output's symbol table no
    /// longer parsed. A name table that is not a plain string table leaves the file alone.
    #[test]
    fn a_name_table_that_is_not_a_string_table_leaves_the_file_alone() {
        // Names come from the relocation section (all zero bytes: every name is empty).
        assert_left_alone(
            &tiny_exec_names_in(1, 2),
            "the section name table (section 2, ) is of type 0x4, not a string table",
        );
    }

    /// Found by the elf_strip fuzz target: section 0 was copied verbatim, so one whose
    /// `sh_info` was 3 claimed, in a two-section output, to relocate a section that no longer
    /// existed (when typed `SHT_CREL`). Section 0 of another type than `SHT_NULL` leaves the
    /// file alone; an `SHT_NULL` one with stray fields is written as a plain null section.
    #[test]
    fn section_zero_is_written_as_a_null_section() {
        let shoff =
            |b: &[u8]| usize::try_from(u64::from_le_bytes(b[40..48].try_into().unwrap())).unwrap();
        let mut input = tiny_exec(1);
        let at = shoff(&input);
        input[at + 44..at + 48].copy_from_slice(&3u32.to_le_bytes());
        let out = strip_bytes(&input, &StripOptions::default());
        assert_eq!(out.action, StripAction::Stripped);
        let new_at = shoff(&out.bytes);
        assert_eq!(&out.bytes[new_at..new_at + 64], &[0u8; 64][..]);
        object::File::parse(&*out.bytes).expect("the output parses");

        input[at + 4..at + 8].copy_from_slice(&elf::SHT_CREL.to_le_bytes());
        assert_left_alone(&input, "section 0 is of type 0x40000014, not SHT_NULL");
    }

    /// The safety net behind the specific checks: removing `.symtab` would leave a malformed
    /// second symbol table (allocated, so it stays) as the first one readers find. The input
    /// reads; the output would not; so the input is kept.
    #[test]
    fn an_output_that_would_not_read_back_is_discarded() {
        let mut input = tiny_exec(1);
        let enc = Enc {
            is_64: true,
            little: true,
        };
        let hidden = Section {
            name: Vec::new(),
            sh_type: elf::SHT_SYMTAB,
            sh_flags: elf::SHF_ALLOC,
            sh_addr: 0,
            sh_offset: 64,
            sh_size: 25,
            sh_link: 0,
            sh_info: 0,
            sh_addralign: 1,
            sh_entsize: 24,
        };
        input.extend(enc.section_header(&hidden, 1).unwrap());
        input[60..62].copy_from_slice(&5u16.to_le_bytes());
        assert!(reads_back(&input).is_ok());
        let out = strip_bytes(&input, &StripOptions::default());
        match &out.action {
            StripAction::Failed(why) => assert!(
                why.starts_with("the stripped file would not read back: "),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(&*out.bytes, &input[..]);
    }

    #[test]
    fn name_table_shares_suffixes() {
        let mk = |n: &str| Section {
            name: n.as_bytes().to_vec(),
            sh_type: 0,
            sh_flags: 0,
            sh_addr: 0,
            sh_offset: 0,
            sh_size: 0,
            sh_link: 0,
            sh_info: 0,
            sh_addralign: 0,
            sh_entsize: 0,
        };
        let secs = [mk(""), mk(".plt"), mk(".rela.plt"), mk(".text"), mk(".plt")];
        let refs: Vec<&Section> = secs.iter().collect();
        let (table, offs) = name_table(&refs);
        assert_eq!(table, b"\0.rela.plt\0.text\0");
        assert_eq!(offs, [0, 6, 1, 11, 6]);
    }

    #[test]
    fn debug_names() {
        assert!(is_debug_name(b".debug_info"));
        assert!(is_debug_name(b".zdebug_str"));
        assert!(is_debug_name(b".stabstr"));
        assert!(!is_debug_name(b".comment"));
        assert!(!is_debug_name(b".gnu_debuglink"));
    }

    #[test]
    fn encoder_checks_bounds_and_width() {
        let enc = Enc {
            is_64: false,
            little: false,
        };
        let mut buf = [0u8; 4];
        enc.put(&mut buf, 0, 0x0102_0304, 4).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(enc.put(&mut buf, 2, 1, 4).is_err());
        assert!(enc.put(&mut buf, 0, 1 << 32, 4).is_err());
    }
}
