//! Boot Loader Specification entry file names with boot counting, as systemd-boot reads and
//! renames them: `bonsai-a+3.conf` (3 tries left, none done), `bonsai-a+2-1.conf` (one try done,
//! 2 left), `bonsai-a+0-3.conf` (used up: sorted last), `bonsai-a.conf` (blessed: no counter).

/// An entry file name, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    /// The name without counter and `.conf`, e.g. `bonsai-a`.
    pub id: String,
    /// `(left, done)`; `None` for an entry without a counter (blessed, or never counted).
    pub counter: Option<(u32, u32)>,
}

impl EntryName {
    /// Parses `name+LEFT[-DONE].conf` or `name.conf`; `None` when it is not a `.conf` file.
    pub fn parse(file: &str) -> Option<EntryName> {
        let stem = file.strip_suffix(".conf")?;
        let Some((id, count)) = stem.rsplit_once('+') else {
            return Some(EntryName {
                id: stem.to_string(),
                counter: None,
            });
        };
        let (left, done) = match count.split_once('-') {
            Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
            None => (count.parse().ok()?, 0),
        };
        Some(EntryName {
            id: id.to_string(),
            counter: Some((left, done)),
        })
    }

    /// The file name.
    pub fn file(&self) -> String {
        match self.counter {
            None => format!("{}.conf", self.id),
            Some((left, 0)) => format!("{}+{left}.conf", self.id),
            Some((left, done)) => format!("{}+{left}-{done}.conf", self.id),
        }
    }

    /// A trial still has tries left; a used-up one has none; a blessed one has no counter.
    pub fn state(&self) -> EntryState {
        match self.counter {
            None => EntryState::Good,
            Some((0, _)) => EntryState::Bad,
            Some(_) => EntryState::Trial,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    Good,
    Trial,
    Bad,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (file, id, counter, state) in [
            (
                "bonsai-a+3.conf",
                "bonsai-a",
                Some((3, 0)),
                EntryState::Trial,
            ),
            (
                "bonsai-a+2-1.conf",
                "bonsai-a",
                Some((2, 1)),
                EntryState::Trial,
            ),
            (
                "bonsai-b+0-3.conf",
                "bonsai-b",
                Some((0, 3)),
                EntryState::Bad,
            ),
            ("bonsai-a.conf", "bonsai-a", None, EntryState::Good),
        ] {
            let e = EntryName::parse(file).unwrap();
            assert_eq!((e.id.as_str(), e.counter, e.state()), (id, counter, state));
            assert_eq!(e.file(), file);
        }
        assert_eq!(EntryName::parse("loader.txt"), None);
        assert_eq!(EntryName::parse("x+y.conf"), None);
    }
}
