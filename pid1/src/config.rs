//! `/etc/bonsai/init.json`: parsed strictly (unknown keys are errors), then validated.

use std::collections::HashSet;
use std::fmt;

use nix::sys::signal::Signal;
use serde::Deserialize;

/// Where the image builder renders the config.
pub const CONFIG_PATH: &str = "/etc/bonsai/init.json";
/// Overrides [`CONFIG_PATH`]; settable from the kernel command line (`BONSAI_INIT_CONFIG=…`
/// becomes init's environment) and used by the PID-namespace tests.
pub const CONFIG_ENV: &str = "BONSAI_INIT_CONFIG";

/// The config file PID 1 reads.
pub fn config_path() -> String {
    match std::env::var(CONFIG_ENV) {
        Ok(path) if !path.is_empty() => path,
        _ => CONFIG_PATH.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default = "default_console")]
    pub console: String,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub tmpfiles: Vec<TmpFile>,
    /// Commands run before the hostname and the tmpfiles (the data mounts).
    #[serde(default)]
    pub early: Vec<Vec<String>>,
    #[serde(default)]
    pub setup: Vec<Vec<String>>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Mount points unmounted at shutdown, in this order, after every process has ended
    /// (remounted read-only when busy).
    #[serde(default)]
    pub unmount: Vec<String>,
    #[serde(default)]
    pub after_start: Vec<Vec<String>>,
    #[serde(default = "default_stop_timeout")]
    pub shutdown_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub fstype: String,
    #[serde(default)]
    pub options: String,
    /// Permission bits applied to the mounted directory (e.g. 1777 for /tmp), if any.
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum TmpFile {
    Dir {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        uid: Option<u32>,
        #[serde(default)]
        gid: Option<u32>,
    },
    File {
        path: String,
        #[serde(default)]
        content: String,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        uid: Option<u32>,
        #[serde(default)]
        gid: Option<u32>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl TmpFile {
    pub fn path(&self) -> &str {
        match self {
            TmpFile::Dir { path, .. }
            | TmpFile::File { path, .. }
            | TmpFile::Symlink { path, .. } => path,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Oneshot,
    Longrun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Output {
    /// Lines go to the console, each prefixed with this string.
    Console(String),
    /// Appended to this file.
    File(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default = "default_kind")]
    pub kind: Kind,
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default = "default_restart")]
    pub restart: Restart,
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// `None` keeps bonsai-init's own credentials.
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// `None` means the console with the prefix `[<name>] `.
    #[serde(default)]
    pub output: Option<Output>,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: i32,
    #[serde(default)]
    pub stop_command: Option<Vec<String>>,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_ms: u64,
    #[serde(default)]
    pub ready_file: Option<String>,
}

impl Service {
    pub fn output(&self) -> Output {
        self.output
            .clone()
            .unwrap_or_else(|| Output::Console(format!("[{}] ", self.name)))
    }

    /// Validated in [`Config::validate`]; SIGTERM is the fallback for hand-built values.
    pub fn signal(&self) -> Signal {
        Signal::try_from(self.stop_signal).unwrap_or(Signal::SIGTERM)
    }
}

fn default_console() -> String {
    "/dev/console".to_string()
}
fn default_kind() -> Kind {
    Kind::Longrun
}
fn default_restart() -> Restart {
    Restart::Always
}
fn default_backoff_initial() -> u64 {
    100
}
fn default_backoff_max() -> u64 {
    5000
}
fn default_cwd() -> String {
    "/".to_string()
}
fn default_stop_signal() -> i32 {
    15
}
fn default_stop_timeout() -> u64 {
    5000
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Config {
    /// Parses and validates; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config =
            serde_json::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        config
            .validate()
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        Ok(config)
    }

    pub fn load(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {path}: {e}")))?;
        Config::parse(&text, path)
    }

    /// Structural checks. Unknown dependencies and cycles are not errors here: the
    /// supervisor logs the services that can never start and runs the others.
    pub fn validate(&self) -> Result<(), String> {
        check_path("console", &self.console)?;
        for (i, m) in self.mounts.iter().enumerate() {
            check_path(&format!("mounts[{i}].target"), &m.target)?;
            if m.fstype.is_empty() {
                return Err(format!("mounts[{i}] ({}): fstype is empty", m.target));
            }
        }
        for (i, t) in self.tmpfiles.iter().enumerate() {
            check_path(&format!("tmpfiles[{i}].path"), t.path())?;
        }
        for (i, argv) in self.setup.iter().enumerate() {
            check_argv(&format!("setup[{i}]"), argv)?;
        }
        for (i, argv) in self.after_start.iter().enumerate() {
            check_argv(&format!("after_start[{i}]"), argv)?;
        }
        let mut names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", s.name);
            if s.name.is_empty() {
                return Err(format!("services[{i}]: name is empty"));
            }
            if !names.insert(s.name.as_str()) {
                return Err(format!("{at}: duplicate service name"));
            }
            check_argv(&format!("{at}.argv"), &s.argv)?;
            check_path(&format!("{at}.cwd"), &s.cwd)?;
            if Signal::try_from(s.stop_signal).is_err() {
                return Err(format!("{at}.stop_signal: {} is no signal", s.stop_signal));
            }
            if let Some(argv) = &s.stop_command {
                check_argv(&format!("{at}.stop_command"), argv)?;
            }
            if let Some(path) = &s.ready_file {
                check_path(&format!("{at}.ready_file"), path)?;
            }
            if let Some(Output::File(path)) = &s.output {
                check_path(&format!("{at}.output.file"), path)?;
            }
        }
        Ok(())
    }
}

fn check_argv(at: &str, argv: &[String]) -> Result<(), String> {
    match argv.first() {
        None => Err(format!("{at}: empty command")),
        Some(p) if p.is_empty() => Err(format!("{at}: empty program name")),
        Some(_) if argv.iter().any(|a| a.contains('\0')) => {
            Err(format!("{at}: argument contains a NUL byte"))
        }
        Some(_) => Ok(()),
    }
}

fn check_path(at: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{at}: {path:?} is not an absolute path"));
    }
    if path.contains('\0') {
        return Err(format!("{at}: path contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "hostname": "qemu-x86_64",
      "console": "/dev/console",
      "mounts": [ {"source": "proc", "target": "/proc", "fstype": "proc", "options": "nosuid,nodev,noexec", "mode": null} ],
      "tmpfiles": [
        {"type": "dir", "path": "/var/lib/app", "mode": 488, "uid": 0, "gid": 0},
        {"type": "file", "path": "/etc/motd", "content": "hi\n", "mode": 420, "uid": 0, "gid": 0},
        {"type": "symlink", "path": "/run/current", "target": "/var/lib/app"}
      ],
      "setup": [ ["/bin/ip", "link", "set", "lo", "up"] ],
      "services": [
        {
          "name": "ticker",
          "argv": ["/bin/sh", "-c", "while :; do date; sleep 5; done"],
          "kind": "longrun",
          "after": ["prepare"],
          "restart": "on-failure",
          "backoff_initial_ms": 100,
          "backoff_max_ms": 5000,
          "uid": 0, "gid": 0,
          "env": [["KEY", "value"]],
          "cwd": "/",
          "output": {"console": "[ticker] "},
          "stop_signal": 15,
          "stop_command": null,
          "stop_timeout_ms": 5000,
          "ready_file": "/run/bonsai/up/ticker"
        },
        {"name": "prepare", "argv": ["/bin/true"], "kind": "oneshot", "output": {"file": "/run/log/prepare"}}
      ],
      "after_start": [ ["/etc/bonsai/harness"] ],
      "shutdown_timeout_ms": 5000
    }"#;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(EXAMPLE, "init.json").unwrap();
        assert_eq!(c.hostname.as_deref(), Some("qemu-x86_64"));
        assert_eq!(c.mounts[0].options, "nosuid,nodev,noexec");
        assert_eq!(c.mounts[0].mode, None);
        assert_eq!(
            c.tmpfiles[0],
            TmpFile::Dir {
                path: "/var/lib/app".into(),
                mode: Some(0o750),
                uid: Some(0),
                gid: Some(0)
            }
        );
        assert_eq!(
            c.tmpfiles[2],
            TmpFile::Symlink {
                path: "/run/current".into(),
                target: "/var/lib/app".into()
            }
        );
        let t = &c.services[0];
        assert_eq!(t.kind, Kind::Longrun);
        assert_eq!(t.restart, Restart::OnFailure);
        assert_eq!(t.env, vec![("KEY".to_string(), "value".to_string())]);
        assert_eq!(t.output(), Output::Console("[ticker] ".into()));
        assert_eq!(t.signal(), Signal::SIGTERM);
        let p = &c.services[1];
        assert_eq!(p.kind, Kind::Oneshot);
        assert_eq!(p.output(), Output::File("/run/log/prepare".into()));
        assert_eq!(p.cwd, "/");
        assert_eq!(p.uid, None);
    }

    #[test]
    fn defaults_fill_an_almost_empty_config() {
        let c = Config::parse(r#"{"services": [{"name": "a", "argv": ["/bin/a"]}]}"#, "x").unwrap();
        assert_eq!(c.console, "/dev/console");
        assert_eq!(c.shutdown_timeout_ms, 5000);
        let a = &c.services[0];
        assert_eq!((a.kind, a.restart), (Kind::Longrun, Restart::Always));
        assert_eq!((a.backoff_initial_ms, a.backoff_max_ms), (100, 5000));
        assert_eq!(a.output(), Output::Console("[a] ".into()));
    }

    #[test]
    fn unknown_fields_are_rejected_everywhere() {
        for bad in [
            r#"{"hostnam": "x"}"#,
            r#"{"services": [{"name": "a", "argv": ["/a"], "restrat": "always"}]}"#,
            r#"{"tmpfiles": [{"type": "dir", "path": "/a", "owner": 0}]}"#,
            r#"{"tmpfiles": [{"type": "fifo", "path": "/a"}]}"#,
            r#"{"mounts": [{"source": "a", "target": "/a", "fstype": "t", "flags": ""}]}"#,
            r#"{"services": [{"name": "a", "argv": ["/a"], "output": {"syslog": "x"}}]}"#,
        ] {
            let err = Config::parse(bad, "/etc/bonsai/init.json").unwrap_err();
            assert!(err.0.starts_with("/etc/bonsai/init.json: "), "{err}");
            assert!(err.0.contains("unknown"), "{bad}: {err}");
        }
    }

    #[test]
    fn malformed_json_names_the_file_and_line() {
        let err = Config::parse("{\n\"services\": [,]}", "/etc/bonsai/init.json").unwrap_err();
        assert!(err.0.starts_with("/etc/bonsai/init.json: "), "{err}");
        assert!(err.0.contains("line 2"), "{err}");
        let err = Config::parse(
            r#"{"services": [{"name": "a", "argv": ["/a"], "kind": "daemon"}]}"#,
            "f",
        )
        .unwrap_err();
        assert!(err.0.contains("daemon"), "{err}");
    }

    #[test]
    fn validation_names_the_offending_key() {
        let cases = [
            (
                r#"{"services": [{"name": "a", "argv": []}]}"#,
                "services[0] (a).argv: empty command",
            ),
            (
                r#"{"services": [{"name": "a", "argv": ["/a"]}, {"name": "a", "argv": ["/b"]}]}"#,
                "services[1] (a): duplicate service name",
            ),
            (
                r#"{"services": [{"name": "a", "argv": ["/a"], "stop_signal": 99}]}"#,
                "services[0] (a).stop_signal: 99 is no signal",
            ),
            (r#"{"setup": [[]]}"#, "setup[0]: empty command"),
            (
                r#"{"tmpfiles": [{"type": "dir", "path": "var/x"}]}"#,
                "tmpfiles[0].path: \"var/x\" is not an absolute path",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(text, "f").unwrap_err();
            assert_eq!(err.0, format!("f: {want}"));
        }
    }

    #[test]
    fn unknown_dependencies_are_left_to_the_supervisor() {
        let c = Config::parse(
            r#"{"services": [{"name": "a", "argv": ["/a"], "after": ["nope"]}]}"#,
            "f",
        );
        assert!(c.is_ok());
    }
}
