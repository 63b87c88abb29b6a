//! Reading ELF files: headers through the `object` crate (which validates every offset and
//! size against the data), turned into plain structs the selection and the stripper share;
//! then the dynamic section (interpreter, DT_NEEDED, RUNPATH/RPATH, soname) and
//! `.note.dlopen` notes. Nothing here panics on malformed input: every read is bounds-checked
//! and a file that does not parse is reported as an error string.

use std::ops::Range;

use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::Endianness;
use serde::Deserialize;

use crate::policy::DlopenPriority;

pub(crate) const ET_REL: u16 = 1;
pub(crate) const ET_EXEC: u16 = 2;
pub(crate) const ET_DYN: u16 = 3;

pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const PT_DYNAMIC: u32 = 2;
pub(crate) const PT_INTERP: u32 = 3;
pub(crate) const PT_NOTE: u32 = 4;

pub(crate) const SHT_NULL: u32 = 0;
pub(crate) const SHT_SYMTAB: u32 = 2;
pub(crate) const SHT_STRTAB: u32 = 3;
pub(crate) const SHT_RELA: u32 = 4;
pub(crate) const SHT_DYNAMIC: u32 = 6;
pub(crate) const SHT_NOTE: u32 = 7;
pub(crate) const SHT_NOBITS: u32 = 8;
pub(crate) const SHT_REL: u32 = 9;
pub(crate) const SHT_DYNSYM: u32 = 11;
pub(crate) const SHT_GROUP: u32 = 17;
pub(crate) const SHT_SYMTAB_SHNDX: u32 = 18;
/// LLVM's compact relocations (`.crel.*`).
pub(crate) const SHT_CREL: u32 = 0x4000_0014;

/// `e_phnum` when the real count is in section 0's `sh_info`.
pub(crate) const PN_XNUM: u16 = 0xffff;

pub(crate) const SHF_ALLOC: u64 = 0x2;
pub(crate) const SHF_INFO_LINK: u64 = 0x40;

pub(crate) const SHN_LORESERVE: u32 = 0xff00;
pub(crate) const SHN_ABS: u16 = 0xfff1;
pub(crate) const SHN_XINDEX: u16 = 0xffff;

const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_SONAME: u64 = 14;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// Note owner and type of systemd's `.note.dlopen` (https://systemd.io/ELF_DLOPEN_METADATA/).
const DLOPEN_NOTE_OWNER: &[u8] = b"FDO";
const DLOPEN_NOTE_TYPE: u32 = 0x407c_0c0a;

/// True if `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// What an ELF file is, for stripping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ElfKind {
    /// ET_EXEC, or ET_DYN with an interpreter (PIE).
    Executable,
    /// ET_DYN without an interpreter.
    SharedLibrary,
    /// ET_REL: kernel modules, object files.
    Relocatable,
    /// Core dumps and OS- or processor-specific types.
    Other,
}

/// A parsed ELF file: the header fields and the program and section headers.
#[derive(Clone, Debug)]
pub(crate) struct ElfFile {
    pub is_64: bool,
    pub little: bool,
    pub e_type: u16,
    pub phoff: u64,
    pub ehsize: u16,
    /// Section numbering is extended (e_shnum = 0 or e_shstrndx = SHN_XINDEX with sections).
    pub extended_numbering: bool,
    pub shstrndx: Option<usize>,
    pub segments: Vec<Segment>,
    pub sections: Vec<Section>,
}

#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub p_type: u32,
    pub p_offset: u64,
    pub p_vaddr: u64,
    pub p_filesz: u64,
    pub p_align: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Section {
    pub name: Vec<u8>,
    pub sh_type: u32,
    pub sh_flags: u64,
    pub sh_addr: u64,
    pub sh_offset: u64,
    pub sh_size: u64,
    pub sh_link: u32,
    pub sh_info: u32,
    pub sh_addralign: u64,
    pub sh_entsize: u64,
}

impl Section {
    pub fn is_alloc(&self) -> bool {
        self.sh_flags & SHF_ALLOC != 0
    }

    /// The file bytes of the section (empty for SHT_NOBITS), or `None` if out of bounds.
    pub fn file_range(&self) -> Option<Range<usize>> {
        if self.sh_type == SHT_NOBITS {
            return Some(0..0);
        }
        let start = usize::try_from(self.sh_offset).ok()?;
        let end = start.checked_add(usize::try_from(self.sh_size).ok()?)?;
        Some(start..end)
    }

    pub fn name_str(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// True if `sh_info` holds a section index.
    pub fn info_is_section(&self) -> bool {
        self.sh_flags & SHF_INFO_LINK != 0 || matches!(self.sh_type, SHT_REL | SHT_RELA | SHT_CREL)
    }
}

impl ElfFile {
    pub fn kind(&self) -> ElfKind {
        match self.e_type {
            ET_EXEC => ElfKind::Executable,
            ET_DYN if self.segments.iter().any(|s| s.p_type == PT_INTERP) => ElfKind::Executable,
            ET_DYN => ElfKind::SharedLibrary,
            ET_REL => ElfKind::Relocatable,
            _ => ElfKind::Other,
        }
    }

    pub fn u32_at(&self, data: &[u8], off: usize) -> Option<u32> {
        let b: [u8; 4] = data.get(off..off.checked_add(4)?)?.try_into().ok()?;
        Some(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    pub fn u64_at(&self, data: &[u8], off: usize) -> Option<u64> {
        let b: [u8; 8] = data.get(off..off.checked_add(8)?)?.try_into().ok()?;
        Some(if self.little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }

    /// A word: 8 bytes in 64-bit files, 4 in 32-bit ones.
    pub fn word_at(&self, data: &[u8], off: usize) -> Option<u64> {
        if self.is_64 {
            self.u64_at(data, off)
        } else {
            self.u32_at(data, off).map(u64::from)
        }
    }

    /// File offset of virtual address `addr`, through the PT_LOAD segments.
    fn addr_to_offset(&self, addr: u64) -> Option<u64> {
        self.segments
            .iter()
            .filter(|s| s.p_type == PT_LOAD)
            .find(|s| addr >= s.p_vaddr && addr - s.p_vaddr < s.p_filesz)
            .and_then(|s| s.p_offset.checked_add(addr - s.p_vaddr))
    }
}

/// Parses the headers of an ELF file.
pub(crate) fn parse(data: &[u8]) -> Result<ElfFile, String> {
    if !is_elf(data) {
        return Err("not an ELF file".into());
    }
    match data.get(4) {
        Some(1) => parse_class::<object::elf::FileHeader32<Endianness>>(data),
        Some(2) => parse_class::<object::elf::FileHeader64<Endianness>>(data),
        _ => Err("unknown ELF class".into()),
    }
}

fn parse_class<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Result<ElfFile, String> {
    let header = Elf::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let segments = header
        .program_headers(endian, data)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|p| Segment {
            p_type: p.p_type(endian).0,
            p_offset: p.p_offset(endian).into(),
            p_vaddr: p.p_vaddr(endian).into(),
            p_filesz: p.p_filesz(endian).into(),
            p_align: p.p_align(endian).into(),
        })
        .collect::<Vec<_>>();
    let headers = header
        .section_headers(endian, data)
        .map_err(|e| e.to_string())?;
    let extended_numbering = !headers.is_empty()
        && (header.e_shnum(endian) == 0 || header.e_shstrndx(endian).0 == SHN_XINDEX);
    let (shstrndx, names) = if headers.is_empty() {
        (None, None)
    } else {
        let index = header.shstrndx(endian, data).map_err(|e| e.to_string())? as usize;
        let strtab = headers
            .get(index)
            .ok_or("section name table index out of range")?;
        let start = Into::<u64>::into(strtab.sh_offset(endian));
        let size = Into::<u64>::into(strtab.sh_size(endian));
        let bytes = usize::try_from(start)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(s, n)| data.get(s..s.checked_add(n)?))
            .ok_or("section name table is out of bounds")?;
        (Some(index), Some(bytes))
    };
    let mut sections = Vec::with_capacity(headers.len());
    for s in headers {
        let name = names
            .and_then(|table| {
                let start = s.sh_name(endian) as usize;
                let rest = table.get(start..)?;
                let len = rest.iter().position(|b| *b == 0)?;
                Some(rest[..len].to_vec())
            })
            .unwrap_or_default();
        sections.push(Section {
            name,
            sh_type: s.sh_type(endian).0,
            sh_flags: s.sh_flags(endian).0,
            sh_addr: s.sh_addr(endian).into(),
            sh_offset: s.sh_offset(endian).into(),
            sh_size: s.sh_size(endian).into(),
            sh_link: s.sh_link(endian),
            sh_info: s.sh_info(endian),
            sh_addralign: s.sh_addralign(endian).into(),
            sh_entsize: s.sh_entsize(endian).into(),
        });
    }
    Ok(ElfFile {
        is_64: header.is_class_64(),
        little: header.is_little_endian(),
        e_type: header.e_type(endian).0,
        phoff: header.e_phoff(endian).into(),
        ehsize: header.e_ehsize(endian),
        extended_numbering,
        shstrndx,
        segments,
        sections,
    })
}

/// What the dynamic linker reads from an ELF file, with where those strings sit in the file
/// (so the reference scanner can skip them: they are followed structurally instead).
#[derive(Clone, Debug, Default)]
pub(crate) struct DynamicInfo {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
    pub runpath: Option<String>,
    pub rpath: Option<String>,
    pub soname: Option<String>,
    /// File ranges of the interpreter string and of DT_NEEDED, DT_RUNPATH and DT_RPATH strings.
    pub string_ranges: Vec<Range<usize>>,
}

/// Reads PT_INTERP and the dynamic section (through PT_DYNAMIC, else the SHT_DYNAMIC
/// section). Strings that are not UTF-8 are read lossily.
pub(crate) fn dynamic_info(elf: &ElfFile, data: &[u8]) -> DynamicInfo {
    let mut info = DynamicInfo::default();
    if let Some(seg) = elf.segments.iter().find(|s| s.p_type == PT_INTERP) {
        if let Some(range) = range_of(seg.p_offset, seg.p_filesz, data.len()) {
            let bytes = &data[range.clone()];
            let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            info.interpreter = Some(String::from_utf8_lossy(&bytes[..len]).into_owned());
            info.string_ranges.push(range.start..range.start + len);
        }
    }

    // The dynamic table's file range, and (offset, size) of its string table when known
    // from the section headers.
    type Table = (Range<usize>, Option<(u64, u64)>);
    let mut table: Option<Table> = None;
    if let Some(seg) = elf.segments.iter().find(|s| s.p_type == PT_DYNAMIC) {
        table = range_of(seg.p_offset, seg.p_filesz, data.len()).map(|r| (r, None));
    }
    if table.is_none() {
        if let Some(sec) = elf.sections.iter().find(|s| s.sh_type == SHT_DYNAMIC) {
            let strtab = elf
                .sections
                .get(sec.sh_link as usize)
                .map(|s| (s.sh_offset, s.sh_size));
            table = range_of(sec.sh_offset, sec.sh_size, data.len()).map(|r| (r, strtab));
        }
    }
    let Some((range, section_strtab)) = table else {
        return info;
    };
    let entry = if elf.is_64 { 16 } else { 8 };
    let word = if elf.is_64 { 8 } else { 4 };
    let mut entries = Vec::new();
    let (mut strtab_addr, mut strsz) = (None, None);
    let mut off = range.start;
    while off + entry <= range.end {
        let (Some(tag), Some(val)) = (elf.word_at(data, off), elf.word_at(data, off + word)) else {
            break;
        };
        match tag {
            DT_NULL => break,
            DT_STRTAB => strtab_addr = Some(val),
            DT_STRSZ => strsz = Some(val),
            DT_NEEDED | DT_SONAME | DT_RPATH | DT_RUNPATH => entries.push((tag, val)),
            _ => {}
        }
        off += entry;
    }
    let strtab = match (
        strtab_addr.and_then(|a| elf.addr_to_offset(a)),
        section_strtab,
    ) {
        (Some(offset), _) => {
            // Without DT_STRSZ, the table runs to the end of its segment (bounded below).
            Some((offset, strsz.unwrap_or(u64::MAX)))
        }
        (None, Some(t)) => Some(t),
        (None, None) => None,
    };
    let Some((str_off, str_size)) = strtab else {
        return info;
    };
    for (tag, val) in entries {
        let Some(start) = str_off.checked_add(val) else {
            continue;
        };
        if val >= str_size {
            continue;
        }
        let Ok(start) = usize::try_from(start) else {
            continue;
        };
        let Some(bytes) = data.get(start..) else {
            continue;
        };
        let max = usize::try_from(str_size - val).unwrap_or(usize::MAX);
        let bytes = &bytes[..bytes.len().min(max)];
        let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let text = String::from_utf8_lossy(&bytes[..len]).into_owned();
        info.string_ranges.push(start..start + len);
        match tag {
            DT_NEEDED => info.needed.push(text),
            DT_SONAME => info.soname = Some(text),
            DT_RPATH => info.rpath = Some(text),
            _ => info.runpath = Some(text),
        }
    }
    info
}

fn range_of(offset: u64, size: u64, len: usize) -> Option<Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    (end <= len).then_some(start..end)
}

/// One entry of a `.note.dlopen` note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DlopenEntry {
    /// Alternatives: the first one found is used.
    pub sonames: Vec<String>,
    pub priority: DlopenPriority,
    pub feature: Option<String>,
}

#[derive(Deserialize)]
struct RawDlopen {
    soname: Vec<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    feature: Option<String>,
}

/// The `.note.dlopen` entries of a file: notes with owner `FDO` and type `0x407c0c0a` whose
/// payload is a JSON array. Read from SHT_NOTE sections, or PT_NOTE segments when the file
/// has no section headers. An unreadable payload is an error string naming the problem.
pub(crate) fn dlopen_notes(elf: &ElfFile, data: &[u8]) -> Result<Vec<DlopenEntry>, String> {
    let mut areas: Vec<(Range<usize>, u64)> = elf
        .sections
        .iter()
        .filter(|s| s.sh_type == SHT_NOTE)
        .filter_map(|s| range_of(s.sh_offset, s.sh_size, data.len()).map(|r| (r, s.sh_addralign)))
        .collect();
    if elf.sections.is_empty() {
        areas = elf
            .segments
            .iter()
            .filter(|s| s.p_type == PT_NOTE)
            .filter_map(|s| range_of(s.p_offset, s.p_filesz, data.len()).map(|r| (r, s.p_align)))
            .collect();
    }
    let mut out = Vec::new();
    for (range, align) in areas {
        let align = if align == 8 { 8 } else { 4 };
        let area = &data[range];
        let mut off = 0usize;
        while off + 12 <= area.len() {
            let (Some(namesz), Some(descsz), Some(kind)) = (
                elf.u32_at(area, off),
                elf.u32_at(area, off + 4),
                elf.u32_at(area, off + 8),
            ) else {
                break;
            };
            let name_start = off + 12;
            let Some(name_end) = name_start.checked_add(namesz as usize) else {
                break;
            };
            let desc_start = align_up(name_end, align);
            let Some(desc_end) = desc_start.checked_add(descsz as usize) else {
                break;
            };
            if desc_end > area.len() {
                break;
            }
            let name = &area[name_start..name_end];
            let name = name.strip_suffix(b"\0").unwrap_or(name);
            if name == DLOPEN_NOTE_OWNER && kind == DLOPEN_NOTE_TYPE {
                let desc = &area[desc_start..desc_end];
                let len = desc.iter().position(|b| *b == 0).unwrap_or(desc.len());
                let raw: Vec<RawDlopen> = serde_json::from_slice(&desc[..len])
                    .map_err(|e| format!("invalid .note.dlopen payload: {e}"))?;
                for r in raw {
                    let priority = match r.priority.as_deref() {
                        None | Some("recommended") => DlopenPriority::Recommended,
                        Some("required") => DlopenPriority::Required,
                        Some("suggested") => DlopenPriority::Suggested,
                        Some(other) => {
                            return Err(format!("invalid .note.dlopen priority {other:?}"))
                        }
                    };
                    out.push(DlopenEntry {
                        sonames: r.soname,
                        priority,
                        feature: r.feature,
                    });
                }
            }
            off = align_up(desc_end, align);
        }
    }
    Ok(out)
}

fn align_up(v: usize, align: usize) -> usize {
    v.checked_add(align - 1)
        .map_or(usize::MAX, |x| x & !(align - 1))
}

/// The `.modinfo` section of a kernel module (`key=value` strings, NUL-separated), as
/// `modinfo` reads it; `None` when `data` is not an ELF file with that section.
pub fn modinfo(data: &[u8]) -> Option<Vec<(String, String)>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(data).ok()?;
    let section = file.section_by_name(".modinfo")?;
    let bytes = section.data().ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter_map(|entry| {
                let s = std::str::from_utf8(entry).ok()?;
                let (k, v) = s.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relocatable ELF like a kernel module, with a `.modinfo` section as modpost writes it.
    #[test]
    fn modinfo_reads_the_key_value_strings_of_a_module() {
        use object::write::Object;
        let mut obj = Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let sec = obj.add_section(
            Vec::new(),
            b".modinfo".to_vec(),
            object::SectionKind::ReadOnlyString,
        );
        obj.append_section_data(
            sec,
            b"license=GPL\0firmware=vendor/chip.bin\0firmware=regulatory.db\0alias=virtio:d00000005v*\0",
            1,
        );
        let data = obj.write().unwrap();
        let info = modinfo(&data).unwrap();
        let fw: Vec<&str> = info
            .iter()
            .filter(|(k, _)| k == "firmware")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(fw, ["vendor/chip.bin", "regulatory.db"]);
        assert_eq!(info[0], ("license".to_string(), "GPL".to_string()));
        assert_eq!(modinfo(b"not an elf"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"").is_err());
        assert!(parse(b"\x7fELF").is_err());
        assert!(parse(b"\x7fELF\x02\x01\x01").is_err());
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[6] = 1;
        // e_shoff far outside the file.
        header[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        header[58] = 64;
        header[60] = 3;
        assert!(parse(&header).is_err());
    }
}
