//! The service description: one schema in the profile (`[services.<name>]`, `[setup]`,
//! `[users.<name>]`, `[groups.<name>]`) that every init backend renders.
//!
//! This module holds the schema as profiles spell it (serde, strict) and its validation into a
//! [`System`]: services in a dependency order, users and groups resolved to numbers, setup
//! steps in the one order every backend applies them (mounts, hostname, directories, files,
//! symlinks, loopback, interfaces, addresses, routes).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// `[services.<name>]` as written in a profile.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceSpec {
    /// argv; the program is a store path or a name found in /bin.
    pub command: Vec<String>,
    #[serde(default)]
    pub kind: Kind,
    /// Services this one starts after (oneshots: after they finished; longruns: once up).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub restart: Restart,
    /// First restart delay; it doubles on each quick restart up to `restart-max-delay-ms`.
    #[serde(default = "default_delay")]
    pub restart_delay_ms: u64,
    #[serde(default = "default_max_delay")]
    pub restart_max_delay_ms: u64,
    pub user: Option<String>,
    pub group: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    pub working_directory: Option<String>,
    #[serde(default)]
    pub output: Output,
    /// TERM (default), INT, HUP, QUIT, KILL, USR1 or USR2.
    pub stop_signal: Option<String>,
    /// Run at shutdown before the stop signal is sent (like ExecStop).
    pub stop_command: Option<Vec<String>>,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_ms: u64,
}

fn default_delay() -> u64 {
    100
}
fn default_max_delay() -> u64 {
    5000
}
fn default_stop_timeout() -> u64 {
    3000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    #[default]
    Longrun,
    Oneshot,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl Restart {
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::OnFailure => "on-failure",
            Restart::Never => "never",
        }
    }
}

/// Where a service's stdout and stderr go.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Output {
    /// The console, every line prefixed with `[<name>] `.
    #[default]
    Console,
    /// `/run/log/<name>/current`, rotated by the backend's logger where it has one.
    Log,
}

/// `[setup]`: what the system does at boot before any service.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SetupSpec {
    pub hostname: Option<String>,
    #[serde(default)]
    pub dirs: Vec<DirSpec>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub symlinks: Vec<SymlinkSpec>,
    #[serde(default)]
    pub interfaces: Vec<InterfaceSpec>,
    /// Filesystems mounted in order before any service, unmounted at shutdown.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

/// `[[setup.mounts]]`: a filesystem on a device given by its path under `/dev`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MountSpec {
    /// The block device, e.g. `/dev/vda`, or `LABEL=<label>`: the device whose filesystem has
    /// that label (ext2/3/4 or FAT, read as the device rules' `{label}`).
    pub device: String,
    /// The label `make-fs` gives the filesystem it makes (FAT: at most 11 characters).
    pub label: Option<String>,
    /// Where it is mounted (made when missing).
    #[serde(rename = "where")]
    pub target: String,
    /// `vfat`, `ext2`, … (the kernel must have it).
    #[serde(rename = "type")]
    pub fstype: String,
    /// mount(8) options.
    #[serde(default = "default_mount_options")]
    pub options: String,
    /// Makes the filesystem when the device is empty (its first 64 KiB all zero): a data
    /// partition on its first boot. A device holding anything else is never formatted.
    #[serde(default)]
    pub make_fs: bool,
    /// How long boot waits for the device to appear, in ms.
    #[serde(default = "default_device_timeout")]
    pub timeout_ms: u64,
}

fn default_mount_options() -> String {
    "rw".into()
}
fn default_device_timeout() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DirSpec {
    pub path: String,
    #[serde(default = "default_dir_mode")]
    pub mode: String,
    pub user: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    pub content: String,
    #[serde(default = "default_file_mode")]
    pub mode: String,
    pub user: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SymlinkSpec {
    pub path: String,
    pub target: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InterfaceSpec {
    pub name: String,
    /// `10.0.2.15/24`, `fec0::15/64`.
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// IPv4 address, default route and /etc/resolv.conf from DHCP (busybox udhcpc).
    #[serde(default)]
    pub dhcp: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RouteSpec {
    /// `default`, `10.1.0.0/16`, `::/0`.
    pub to: String,
    pub via: Option<String>,
}

fn default_dir_mode() -> String {
    "0755".into()
}
fn default_file_mode() -> String {
    "0644".into()
}

/// `[users.<name>]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UserSpec {
    /// Required for every user but root (0).
    pub uid: Option<u32>,
    /// Primary group name (default: a group of the user's name, which must exist).
    pub group: Option<String>,
    /// Default `/var/empty` (root: `/root`).
    pub home: Option<String>,
    /// Default `/bin/false` (root: `/bin/sh`).
    pub shell: Option<String>,
    /// `locked` (the default), `empty` (no password; development images only) or a crypt(3)
    /// hash starting with `$`, written to /etc/shadow as is.
    pub password: Option<String>,
}

/// A user's password in /etc/shadow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Password {
    /// `*`: no password logs in (a console shell needs none; SSH logs in with keys).
    #[default]
    Locked,
    /// An empty field: logs in without a password.
    Empty,
    /// A crypt(3) hash, as given.
    Hash(String),
}

impl Password {
    /// Parses the `password` key; errors name `key`.
    pub fn parse(s: &str, key: &str) -> Result<Password, String> {
        match s {
            "locked" => Ok(Password::Locked),
            "empty" => Ok(Password::Empty),
            h if h.starts_with('$') && !h.contains([':', '\n', '\r']) => {
                Ok(Password::Hash(h.to_string()))
            }
            _ => Err(format!(
                "{key}: '{s}' is not \"locked\", \"empty\" or a crypt(3) hash starting with '$'"
            )),
        }
    }

    /// The second field of the user's /etc/shadow line.
    pub fn shadow_field(&self) -> &str {
        match self {
            Password::Locked => "*",
            Password::Empty => "",
            Password::Hash(h) => h,
        }
    }
}

/// `[groups.<name>]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GroupSpec {
    pub gid: u32,
}

/// The whole description, as merged from a profile and its parents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemSpec {
    pub services: BTreeMap<String, ServiceSpec>,
    pub setup: SetupSpec,
    pub users: BTreeMap<String, UserSpec>,
    pub groups: BTreeMap<String, GroupSpec>,
    pub health: HealthSpec,
    pub kernel: KernelSpec,
    /// `[[device-rules]]`, in order (parents' first).
    pub device_rules: Vec<crate::devices::DeviceRuleSpec>,
}

/// A profile's `[kernel]`: the loadable modules the image carries.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KernelSpec {
    /// Modules the image carries, with what they depend on (`modules.dep`); each is loaded when
    /// a device whose modalias it matches is there at boot.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Modules loaded at boot in this order, device or not (each also in `modules`).
    #[serde(default)]
    pub load: Vec<String>,
}

/// `[health]`: what a boot from a disk slot must pass before a trial boot is blessed. Services
/// up always counts; these commands come on top.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthSpec {
    /// From the kernel's start: a trial boot not healthy by then is ended by the watchdog.
    pub trial_deadline_ms: Option<u64>,
    /// `[health.checks.<name>]`.
    #[serde(default)]
    pub checks: BTreeMap<String, HealthCheckSpec>,
}

/// `[health.checks.<name>]`: a command that must exit 0 within its deadline.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// argv; the program is a store path or a name found in /bin.
    pub command: Vec<String>,
    /// From services up; the command is tried again until it passes or the deadline passes.
    #[serde(default = "default_health_deadline")]
    pub deadline_ms: u64,
}

fn default_health_deadline() -> u64 {
    10_000
}

/// The trial deadline when `[health]` does not set one.
pub const DEFAULT_TRIAL_DEADLINE_MS: u64 = 30_000;

/// The validated `[health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub trial_deadline_ms: u64,
    /// In name order.
    pub checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub name: String,
    pub argv: Vec<String>,
    pub deadline_ms: u64,
}

fn health(spec: &HealthSpec, program_exists: &dyn Fn(&str) -> bool) -> Result<Health, String> {
    let trial_deadline_ms = spec.trial_deadline_ms.unwrap_or(DEFAULT_TRIAL_DEADLINE_MS);
    if !(1000..=3_600_000).contains(&trial_deadline_ms) {
        return Err(format!(
            "health.trial-deadline-ms: {trial_deadline_ms} is outside 1000..=3600000"
        ));
    }
    let mut checks = Vec::new();
    for (name, c) in &spec.checks {
        check_name(name, "health.checks")?;
        let key = format!("health.checks.{name}");
        check_program(&key, &c.command, program_exists)?;
        if c.deadline_ms == 0 || c.deadline_ms >= trial_deadline_ms {
            return Err(format!(
                "{key}.deadline-ms: {} must be above 0 and below the trial deadline ({trial_deadline_ms} ms)",
                c.deadline_ms
            ));
        }
        checks.push(HealthCheck {
            name: name.clone(),
            argv: c.command.clone(),
            deadline_ms: c.deadline_ms,
        });
    }
    Ok(Health {
        trial_deadline_ms,
        checks,
    })
}

// ------------------------------------------------------------------ validated form

/// A validated service: names resolved, numbers checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub argv: Vec<String>,
    pub kind: Kind,
    pub after: Vec<String>,
    pub restart: Restart,
    pub restart_delay_ms: u64,
    pub restart_max_delay_ms: u64,
    pub uid: u32,
    pub gid: u32,
    pub environment: Vec<(String, String)>,
    pub working_directory: String,
    pub output: Output,
    pub stop_signal: (String, i32),
    pub stop_command: Option<Vec<String>>,
    pub stop_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    pub password: Password,
}

/// One boot-time step, in the order every backend applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Dir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        path: String,
        content: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// One `[[setup.mounts]]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataMount {
    pub device: String,
    pub label: Option<String>,
    pub target: String,
    pub fstype: String,
    pub options: String,
    /// The program (argv without the device) that makes the filesystem on an empty device.
    pub make_fs: Option<Vec<String>>,
    pub timeout_ms: u64,
}

/// The validated system: services in a topological order (dependencies first, then by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    pub hostname: String,
    pub services: Vec<Service>,
    pub steps: Vec<Step>,
    /// `[[setup.mounts]]` in order: mounted before the other steps, unmounted in reverse.
    pub mounts: Vec<DataMount>,
    /// `[kernel] modules`: when set, the modules step runs first of the setup (coldplug by
    /// modalias), after the `load` list in order.
    pub modules: Option<Modules>,
    /// `[[device-rules]]` (and, with loadable modules, loading by modalias at hotplug): when
    /// set, the devices step runs after the modules step and before the mounts.
    pub devices: Option<crate::devices::Devices>,
    /// Commands (full argv: /bin/sysctl, /bin/ip) applied in order after loopback is up.
    pub network: Vec<Vec<String>>,
    pub users: Vec<User>,
    pub groups: Vec<(String, u32)>,
    pub health: Health,
}

impl System {
    pub fn longruns(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(|s| s.kind == Kind::Longrun)
    }
    pub fn oneshots(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(|s| s.kind == Kind::Oneshot)
    }
}

/// The modules step: `[kernel] load` in order, then every module a present device asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modules {
    pub load: Vec<String>,
}

/// The shared script that gets a DHCP lease for one interface (every backend runs it).
pub const DHCP_SCRIPT: &str = "/etc/bonsai/dhcp";

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
];

/// Validates a spec. `program_exists` answers whether a command's program is in the image
/// (given as written: an absolute path, or a bare name looked up in /bin). Errors name the
/// profile key they are about: `services.web.after: unknown service 'db'`.
pub fn validate(
    spec: &SystemSpec,
    default_hostname: &str,
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<System, String> {
    let accounts = accounts(spec)?;
    let mut services = BTreeMap::new();
    for (name, s) in &spec.services {
        services.insert(
            name.clone(),
            service(spec, name, s, &accounts, program_exists)?,
        );
    }
    let order = topo_order(&services)?;
    let steps = setup_steps(spec, &accounts)?;
    let network = network(spec, program_exists)?;
    let mounts = data_mounts(spec, program_exists)?;
    let modules = modules(&spec.kernel, program_exists)?;
    let module_names: Vec<String> = spec.kernel.modules.iter().map(|m| module_name(m)).collect();
    let devices = crate::devices::validate(
        &spec.device_rules,
        &|key: &str, owner: &Option<String>, group: &Option<String>| {
            accounts
                .resolve(key, owner, group)
                .map_err(|e| e.replace(".user:", ".owner:"))
        },
        &module_names,
        program_exists,
    )?;
    let hostname = hostname(spec, default_hostname)?;
    let health = health(&spec.health, program_exists)?;
    Ok(System {
        hostname,
        services: order.into_iter().map(|n| services[&n].clone()).collect(),
        steps,
        mounts,
        modules,
        devices,
        network,
        users: accounts.users.into_values().collect(),
        groups: accounts.groups.into_iter().collect(),
        health,
    })
}

/// Groups and users by name, root (and the tty group) always present.
struct Accounts {
    groups: BTreeMap<String, u32>,
    users: BTreeMap<String, User>,
}

impl Accounts {
    /// The uid and gid of a `user`/`group` pair under `key` (root's when no user is given).
    fn resolve(
        &self,
        key: &str,
        user: &Option<String>,
        group: &Option<String>,
    ) -> Result<(u32, u32), String> {
        let u = match user {
            None => &self.users["root"],
            Some(n) => self
                .users
                .get(n)
                .ok_or_else(|| format!("{key}.user: unknown user '{n}' (define [users.{n}])"))?,
        };
        let gid = match group {
            None => u.gid,
            Some(g) => *self
                .groups
                .get(g)
                .ok_or_else(|| format!("{key}.group: unknown group '{g}' (define [groups.{g}])"))?,
        };
        Ok((u.uid, gid))
    }
}

fn accounts(spec: &SystemSpec) -> Result<Accounts, String> {
    // Groups and users, root always present.
    let mut groups: BTreeMap<String, u32> = BTreeMap::new();
    groups.insert("root".into(), 0);
    groups.insert("tty".into(), 5);
    for (name, g) in &spec.groups {
        check_name(name, "groups")?;
        if groups.insert(name.clone(), g.gid).is_some() && name != "root" && name != "tty" {
            return Err(format!("groups.{name}: defined twice"));
        }
    }
    let mut users: BTreeMap<String, User> = BTreeMap::new();
    users.insert(
        "root".into(),
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            shell: "/bin/sh".into(),
            password: Password::Locked,
        },
    );
    for (name, u) in &spec.users {
        check_name(name, "users")?;
        let root = name == "root";
        let uid = match (u.uid, root) {
            (Some(uid), _) => uid,
            (None, true) => 0,
            (None, false) => {
                return Err(format!(
                    "users.{name}.uid: missing (every user but root needs one)"
                ))
            }
        };
        let password = match &u.password {
            None => Password::Locked,
            Some(p) => Password::parse(p, &format!("users.{name}.password"))?,
        };
        let gname = u.group.clone().unwrap_or_else(|| name.clone());
        let gid = *groups.get(&gname).ok_or_else(|| {
            format!("users.{name}.group: unknown group '{gname}' (define [groups.{gname}])")
        })?;
        users.insert(
            name.clone(),
            User {
                name: name.clone(),
                uid,
                gid,
                home: u
                    .home
                    .clone()
                    .unwrap_or_else(|| if root { "/root" } else { "/var/empty" }.into()),
                shell: u
                    .shell
                    .clone()
                    .unwrap_or_else(|| if root { "/bin/sh" } else { "/bin/false" }.into()),
                password,
            },
        );
    }
    Ok(Accounts { groups, users })
}

/// `<key>.command` names a program the image has.
fn check_program(
    key: &str,
    command: &[String],
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let program = command
        .first()
        .ok_or_else(|| format!("{key}.command: empty"))?;
    if !program_exists(program) {
        return Err(format!(
            "{key}.command: program '{program}' is not in the image"
        ));
    }
    Ok(())
}

/// One `[services.<name>]`, checked and resolved.
fn service(
    spec: &SystemSpec,
    name: &str,
    s: &ServiceSpec,
    accounts: &Accounts,
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<Service, String> {
    check_name(name, "services")?;
    let key = format!("services.{name}");
    check_program(&key, &s.command, program_exists)?;
    for dep in &s.after {
        if !spec.services.contains_key(dep) {
            return Err(format!("{key}.after: unknown service '{dep}'"));
        }
        if dep == name {
            return Err(format!("{key}.after: a service cannot start after itself"));
        }
    }
    if s.restart_delay_ms == 0 || s.restart_max_delay_ms < s.restart_delay_ms {
        return Err(format!(
            "{key}: restart-delay-ms must be at least 1 and at most restart-max-delay-ms"
        ));
    }
    let (uid, gid) = accounts.resolve(&key, &s.user, &s.group)?;
    if let Some(u) = accounts.users.values().find(|u| u.uid == uid) {
        if u.gid != gid {
            return Err(format!("{key}.group: a service runs with its user's primary group ({}); give the user that group instead", u.gid));
        }
    }
    let sig = s.stop_signal.clone().unwrap_or_else(|| "TERM".into());
    let signum = SIGNALS
        .iter()
        .find(|(n, _)| *n == sig.trim_start_matches("SIG"))
        .map(|(_, n)| *n)
        .ok_or_else(|| format!("{key}.stop-signal: unknown signal '{sig}' (expected TERM, INT, HUP, QUIT, KILL, USR1 or USR2)"))?;
    for k in s.environment.keys() {
        if k.is_empty()
            || k.contains('=')
            || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!("{key}.environment: '{k}' is not a variable name"));
        }
    }
    if let Some(stop) = &s.stop_command {
        if stop.is_empty() {
            return Err(format!("{key}.stop-command: empty"));
        }
    }
    let wd = s.working_directory.clone().unwrap_or_else(|| "/".into());
    if !wd.starts_with('/') {
        return Err(format!("{key}.working-directory: '{wd}' is not absolute"));
    }
    Ok(Service {
        name: name.to_string(),
        argv: s.command.clone(),
        kind: s.kind,
        after: s.after.clone(),
        restart: s.restart,
        restart_delay_ms: s.restart_delay_ms,
        restart_max_delay_ms: s.restart_max_delay_ms,
        uid,
        gid,
        environment: s
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        working_directory: wd,
        output: s.output,
        stop_signal: (sig.trim_start_matches("SIG").to_string(), signum),
        stop_command: s.stop_command.clone(),
        stop_timeout_ms: s.stop_timeout_ms,
    })
}

/// `[[setup.dirs]]`, `[[setup.files]]` and `[[setup.symlinks]]`, in that order.
fn setup_steps(spec: &SystemSpec, accounts: &Accounts) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for (i, d) in spec.setup.dirs.iter().enumerate() {
        let key = format!("setup.dirs[{i}]");
        check_abs(&d.path, &key)?;
        let (uid, gid) = accounts.resolve(&key, &d.user, &d.group)?;
        steps.push(Step::Dir {
            path: d.path.clone(),
            mode: parse_mode(&d.mode, &key)?,
            uid,
            gid,
        });
    }
    for (i, f) in spec.setup.files.iter().enumerate() {
        let key = format!("setup.files[{i}]");
        check_abs(&f.path, &key)?;
        let (uid, gid) = accounts.resolve(&key, &f.user, &f.group)?;
        steps.push(Step::File {
            path: f.path.clone(),
            content: f.content.clone(),
            mode: parse_mode(&f.mode, &key)?,
            uid,
            gid,
        });
    }
    for (i, l) in spec.setup.symlinks.iter().enumerate() {
        let key = format!("setup.symlinks[{i}]");
        check_abs(&l.path, &key)?;
        if l.target.is_empty() {
            return Err(format!("{key}.target: empty"));
        }
        steps.push(Step::Symlink {
            path: l.path.clone(),
            target: l.target.clone(),
        });
    }

    Ok(steps)
}

/// A module name as the kernel spells it (`-` and `_` are the same to modprobe).
pub fn module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// `[kernel]`, checked: names, `load` within `modules`, and modprobe in the image.
fn modules(
    spec: &KernelSpec,
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<Option<Modules>, String> {
    if spec.modules.is_empty() {
        if let Some(m) = spec.load.first() {
            return Err(format!("kernel.load: '{m}' is not in kernel.modules"));
        }
        return Ok(None);
    }
    for m in spec.modules.iter().chain(&spec.load) {
        if m.is_empty()
            || !m
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!("kernel.modules: '{m}' is not a module name"));
        }
    }
    let names: Vec<String> = spec.modules.iter().map(|m| module_name(m)).collect();
    if let Some(m) = spec.load.iter().find(|m| !names.contains(&module_name(m))) {
        return Err(format!("kernel.load: '{m}' is not in kernel.modules"));
    }
    if !program_exists("modprobe") {
        return Err(
            "kernel.modules: loading modules needs modprobe (busybox), which the image does not have"
                .into(),
        );
    }
    Ok(Some(Modules {
        load: spec.load.iter().map(|m| module_name(m)).collect(),
    }))
}

/// The program that makes a filesystem of `fstype`, with its label option.
fn mkfs_argv(fstype: &str, label: Option<&str>) -> Option<Vec<String>> {
    let (prog, flag) = match fstype {
        "vfat" => ("mkdosfs", "-n"),
        "ext2" => ("mke2fs", "-L"),
        _ => return None,
    };
    let mut argv = vec![prog.to_string()];
    if let Some(l) = label {
        // FAT pads its 11-byte label with spaces (busybox's mkdosfs would pad with NULs).
        let l = if fstype == "vfat" {
            format!("{l:<11}")
        } else {
            l.to_string()
        };
        argv.extend([flag.to_string(), l]);
    }
    Some(argv)
}

/// `[[setup.mounts]]`, checked: a device or a label, an absolute target, a known mkfs.
fn data_mounts(
    spec: &SystemSpec,
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<DataMount>, String> {
    let mut out: Vec<DataMount> = Vec::new();
    let simple = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    for (i, m) in spec.setup.mounts.iter().enumerate() {
        let key = format!("setup.mounts[{i}]");
        if !m.target.starts_with('/') || m.target.split('/').any(|c| c == "..") {
            return Err(format!("{key}.where: '{}' is not absolute", m.target));
        }
        if m.target == "/" || out.iter().any(|o| o.target == m.target) {
            return Err(format!(
                "{key}.where: '{}' is the root or mounted twice",
                m.target
            ));
        }
        if !simple(&m.fstype) {
            return Err(format!(
                "{key}.type: '{}' is not a filesystem type",
                m.fstype
            ));
        }
        if m.options.is_empty() || m.options.contains([' ', '\'', '"', '\n']) {
            return Err(format!(
                "{key}.options: '{}' is not a mount option list",
                m.options
            ));
        }
        let d = &m.device;
        if let Some(l) = d.strip_prefix("LABEL=") {
            if !simple(l) || l.len() > 16 {
                return Err(format!(
                    "{key}.device: '{d}' is not a label (letters, digits, - _ ., at most 16)"
                ));
            }
            if m.make_fs {
                return Err(format!(
                    "{key}.make-fs: needs a device path, not '{d}' (an empty device has no label)"
                ));
            }
        } else if !d.starts_with("/dev/") || d.contains([' ', '\'', '"', '\n']) {
            return Err(format!(
                "{key}.device: '{d}' is neither a device path under /dev nor LABEL=<label>"
            ));
        }
        if let Some(l) = &m.label {
            if !simple(l) || l.len() > 11 {
                return Err(format!(
                    "{key}.label: '{l}' is not a label (letters, digits, - _ ., at most 11)"
                ));
            }
        }
        let make_fs = if m.make_fs {
            let argv = mkfs_argv(&m.fstype, m.label.as_deref()).ok_or_else(|| {
                format!(
                    "{key}.make-fs: bonsai makes vfat (mkdosfs) and ext2 (mke2fs), not '{}'",
                    m.fstype
                )
            })?;
            if !program_exists(&argv[0]) {
                return Err(format!(
                    "{key}.make-fs: needs {} (busybox), which the image does not have",
                    argv[0]
                ));
            }
            Some(argv)
        } else {
            None
        };
        if m.timeout_ms == 0 || m.timeout_ms > 600_000 {
            return Err(format!(
                "{key}.timeout-ms: {} is not between 1 and 600000",
                m.timeout_ms
            ));
        }
        out.push(DataMount {
            device: m.device.clone(),
            label: m.label.clone(),
            target: m.target.clone(),
            fstype: m.fstype.clone(),
            options: m.options.clone(),
            make_fs,
            timeout_ms: m.timeout_ms,
        });
    }
    Ok(out)
}

/// The `sysctl` and `ip` commands for `[[setup.interfaces]]`, in order; `dhcp = true` adds the
/// shared `/etc/bonsai/dhcp <name>` after the link is up.
fn network(
    spec: &SystemSpec,
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<Vec<String>>, String> {
    let mut network = Vec::new();
    for (i, iface) in spec.setup.interfaces.iter().enumerate() {
        let key = format!("setup.interfaces[{i}]");
        if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains(['/', ' ']) {
            return Err(format!(
                "{key}.name: '{}' is not an interface name",
                iface.name
            ));
        }
        let ip = |args: &[&str]| -> Vec<String> {
            std::iter::once("/bin/ip")
                .chain(args.iter().copied())
                .map(String::from)
                .collect()
        };
        if iface.addresses.iter().any(|a| a.contains(':')) {
            // Static means static: no router advertisements, no SLAAC, no duplicate address
            // detection (the address is usable, and listed the same, at once).
            for knob in ["accept_ra", "autoconf", "accept_dad"] {
                network.push(vec![
                    "/bin/sysctl".into(),
                    "-w".into(),
                    format!("net.ipv6.conf.{}.{knob}=0", iface.name),
                ]);
            }
        }
        network.push(ip(&["link", "set", &iface.name, "up"]));
        if iface.dhcp {
            if !program_exists("udhcpc") {
                return Err(format!(
                    "{key}.dhcp: needs udhcpc (busybox), which the image does not have"
                ));
            }
            network.push(vec![DHCP_SCRIPT.into(), iface.name.clone()]);
        }
        for a in &iface.addresses {
            check_cidr(a, &format!("{key}.addresses"))?;
            network.push(ip(&["addr", "add", a, "dev", &iface.name]));
        }
        for r in &iface.routes {
            let v6 = if r.to == "default" {
                r.via.as_deref().is_some_and(|v| v.contains(':'))
            } else {
                check_cidr(&r.to, &format!("{key}.routes"))?
            };
            let mut cmd = ip(&[if v6 { "-6" } else { "-4" }, "route", "add", &r.to]);
            if let Some(via) = &r.via {
                cmd.extend(["via".into(), via.clone()]);
            }
            cmd.extend(["dev".into(), iface.name.clone()]);
            network.push(cmd);
        }
    }

    Ok(network)
}

fn hostname(spec: &SystemSpec, default_hostname: &str) -> Result<String, String> {
    let hostname = spec
        .setup
        .hostname
        .clone()
        .unwrap_or_else(|| default_hostname.to_string());
    if hostname.is_empty()
        || hostname.len() > 64
        || !hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(format!("setup.hostname: '{hostname}' is not a host name"));
    }
    Ok(hostname)
}

fn check_name(name: &str, table: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{table}.{name}: names are letters, digits, - and _ (at most 32)"
        ))
    }
}

fn check_abs(path: &str, key: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!(
            "{key}.path: '{path}' is not an absolute path without '..'"
        ));
    }
    Ok(())
}

fn parse_mode(s: &str, key: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{key}.mode: '{s}' is not an octal mode"))
}

/// Returns whether the address is IPv6.
fn check_cidr(s: &str, key: &str) -> Result<bool, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{key}: '{s}' needs a prefix length (/24)"))?;
    let v6 = addr.parse::<std::net::Ipv6Addr>().is_ok();
    let v4 = addr.parse::<std::net::Ipv4Addr>().is_ok();
    let max = if v6 { 128 } else { 32 };
    match len.parse::<u32>() {
        Ok(l) if (v4 || v6) && l <= max => Ok(v6),
        _ => Err(format!(
            "{key}: '{s}' is not an address with a prefix length"
        )),
    }
}

/// Dependencies first; ties broken by name. A cycle is an error naming it.
fn topo_order(services: &BTreeMap<String, Service>) -> Result<Vec<String>, String> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    fn visit(
        name: &str,
        services: &BTreeMap<String, Service>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), String> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(pos) = stack.iter().position(|n| n == name) {
            let mut chain = stack[pos..].join(" -> ");
            chain.push_str(" -> ");
            chain.push_str(name);
            return Err(format!("services.{name}.after: dependency cycle {chain}"));
        }
        stack.push(name.to_string());
        let mut deps = services[name].after.clone();
        deps.sort();
        for d in deps {
            visit(&d, services, stack, done, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    for name in services.keys() {
        visit(name, services, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(cmd: &str) -> ServiceSpec {
        toml_service(&format!("command = [\"{cmd}\"]"))
    }

    fn toml_service(text: &str) -> ServiceSpec {
        serde_json::from_value(serde_json::to_value(toml_like(text)).unwrap()).unwrap()
    }

    // Tiny helper: parse `command = ["x"]`-style lines through serde_json.
    fn toml_like(text: &str) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for line in text.lines() {
            let (k, v) = line.split_once(" = ").unwrap();
            map.insert(k.to_string(), serde_json::from_str(v).unwrap());
        }
        serde_json::Value::Object(map)
    }

    fn all_exist(_: &str) -> bool {
        true
    }

    #[test]
    fn orders_dependencies_first() {
        let mut spec = SystemSpec::default();
        let mut web = svc("/bin/web");
        web.after = vec!["db".into(), "prep".into()];
        let mut db = svc("/bin/db");
        db.after = vec!["prep".into()];
        let mut prep = svc("/bin/prep");
        prep.kind = Kind::Oneshot;
        spec.services.insert("web".into(), web);
        spec.services.insert("db".into(), db);
        spec.services.insert("prep".into(), prep);
        let sys = validate(&spec, "h", &all_exist).unwrap();
        let names: Vec<&str> = sys.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["prep", "db", "web"]);
    }

    #[test]
    fn cycles_unknown_deps_missing_programs_and_users_are_errors() {
        let mut spec = SystemSpec::default();
        let mut a = svc("/bin/a");
        a.after = vec!["b".into()];
        let mut b = svc("/bin/b");
        b.after = vec!["a".into()];
        spec.services.insert("a".into(), a.clone());
        spec.services.insert("b".into(), b);
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "services.a.after: dependency cycle a -> b -> a"
        );

        let mut spec = SystemSpec::default();
        spec.services.insert("a".into(), a);
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "services.a.after: unknown service 'b'"
        );

        let mut spec = SystemSpec::default();
        spec.services.insert("x".into(), svc("/bin/nope"));
        assert_eq!(
            validate(&spec, "h", &|p| p != "/bin/nope").unwrap_err(),
            "services.x.command: program '/bin/nope' is not in the image"
        );

        let mut spec = SystemSpec::default();
        let mut u = svc("/bin/u");
        u.user = Some("ghost".into());
        spec.services.insert("u".into(), u);
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "services.u.user: unknown user 'ghost' (define [users.ghost])"
        );
    }

    fn mount(toml_text: &str) -> MountSpec {
        serde_json::from_value(toml_like(toml_text)).unwrap()
    }

    #[test]
    fn dhcp_runs_the_shared_script_after_the_link_is_up() {
        let mut spec = SystemSpec::default();
        spec.setup.interfaces.push(InterfaceSpec {
            name: "eth1".into(),
            addresses: vec![],
            routes: vec![],
            dhcp: true,
        });
        let sys = validate(&spec, "h", &all_exist).unwrap();
        let text: Vec<String> = sys.network.iter().map(|c| c.join(" ")).collect();
        assert_eq!(text, ["/bin/ip link set eth1 up", "/etc/bonsai/dhcp eth1"]);
        let no_udhcpc = |p: &str| p != "udhcpc";
        assert_eq!(
            validate(&spec, "h", &no_udhcpc).unwrap_err(),
            "setup.interfaces[0].dhcp: needs udhcpc (busybox), which the image does not have"
        );
    }

    #[test]
    fn kernel_modules_are_checked_and_name_their_key() {
        let mut spec = SystemSpec::default();
        assert_eq!(validate(&spec, "h", &all_exist).unwrap().modules, None);
        spec.kernel.modules = vec!["virtio-balloon".into(), "test_firmware".into()];
        spec.kernel.load = vec!["test-firmware".into()];
        let sys = validate(&spec, "h", &all_exist).unwrap();
        assert_eq!(sys.modules.unwrap().load, ["test_firmware"]);
        let no_modprobe = |p: &str| p != "modprobe";
        assert_eq!(
            validate(&spec, "h", &no_modprobe).unwrap_err(),
            "kernel.modules: loading modules needs modprobe (busybox), which the image does not have"
        );
        spec.kernel.load = vec!["virtio_net".into()];
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "kernel.load: 'virtio_net' is not in kernel.modules"
        );
        spec.kernel.load.clear();
        spec.kernel.modules.push("../evil".into());
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "kernel.modules: '../evil' is not a module name"
        );
    }

    #[test]
    fn mounts_are_checked_and_name_their_key() {
        let mut spec = SystemSpec::default();
        spec.setup.mounts.push(mount(
            "device = \"/dev/vda\"\nlabel = \"data\"\nwhere = \"/data\"\ntype = \"vfat\"\nmake-fs = true",
        ));
        let sys = validate(&spec, "h", &all_exist).unwrap();
        assert_eq!(sys.mounts[0].options, "rw");
        assert_eq!(sys.mounts[0].timeout_ms, 5000);
        assert_eq!(
            sys.mounts[0].make_fs.as_deref(),
            Some(&["mkdosfs".to_string(), "-n".into(), "data       ".into()][..])
        );
        let bad = |t: &str| {
            let mut spec = SystemSpec::default();
            spec.setup.mounts.push(mount(t));
            validate(&spec, "h", &all_exist).unwrap_err()
        };
        assert_eq!(
            bad("device = \"/dev/vda\"\nwhere = \"/data\"\ntype = \"xfs\"\nmake-fs = true"),
            "setup.mounts[0].make-fs: bonsai makes vfat (mkdosfs) and ext2 (mke2fs), not 'xfs'"
        );
        assert_eq!(
            bad("device = \"vda\"\nwhere = \"/data\"\ntype = \"vfat\""),
            "setup.mounts[0].device: 'vda' is neither a device path under /dev nor LABEL=<label>"
        );
        assert_eq!(
            bad("device = \"/dev/vda\"\nlabel = \"much-too-long\"\nwhere = \"/data\"\ntype = \"vfat\""),
            "setup.mounts[0].label: 'much-too-long' is not a label (letters, digits, - _ ., at most 11)"
        );
        assert_eq!(
            bad("device = \"/dev/vda\"\nwhere = \"data\"\ntype = \"vfat\""),
            "setup.mounts[0].where: 'data' is not absolute"
        );
        assert_eq!(
            bad("device = \"LABEL=data\"\nwhere = \"/data\"\ntype = \"vfat\"\nmake-fs = true"),
            "setup.mounts[0].make-fs: needs a device path, not 'LABEL=data' (an empty device has no label)"
        );
        assert_eq!(
            bad("device = \"LABEL=a b\"\nwhere = \"/data\"\ntype = \"vfat\""),
            "setup.mounts[0].device: 'LABEL=a b' is not a label (letters, digits, - _ ., at most 16)"
        );
        let mut spec = SystemSpec::default();
        spec.setup.mounts.push(mount(
            "device = \"LABEL=data\"\nwhere = \"/data\"\ntype = \"vfat\"",
        ));
        let sys = validate(&spec, "h", &all_exist).unwrap();
        let script = crate::backends::tests_mounts_script(&sys);
        assert!(script.contains("dev=$(bylabel data)"), "{script}");
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}");
        let mut spec = SystemSpec::default();
        spec.setup.mounts.push(mount(
            "device = \"/dev/vda\"\nwhere = \"/data\"\ntype = \"vfat\"\nmake-fs = true",
        ));
        let no_mkdosfs = |p: &str| p != "mkdosfs";
        assert_eq!(
            validate(&spec, "h", &no_mkdosfs).unwrap_err(),
            "setup.mounts[0].make-fs: needs mkdosfs (busybox), which the image does not have"
        );
    }

    #[test]
    fn network_commands_are_rendered_in_order() {
        let mut spec = SystemSpec::default();
        spec.setup.interfaces.push(InterfaceSpec {
            name: "eth0".into(),
            addresses: vec!["10.0.2.15/24".into(), "fec0::15/64".into()],
            routes: vec![RouteSpec {
                to: "default".into(),
                via: Some("10.0.2.2".into()),
            }],
            dhcp: false,
        });
        let sys = validate(&spec, "h", &all_exist).unwrap();
        let text: Vec<String> = sys.network.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            text,
            [
                "/bin/sysctl -w net.ipv6.conf.eth0.accept_ra=0",
                "/bin/sysctl -w net.ipv6.conf.eth0.autoconf=0",
                "/bin/sysctl -w net.ipv6.conf.eth0.accept_dad=0",
                "/bin/ip link set eth0 up",
                "/bin/ip addr add 10.0.2.15/24 dev eth0",
                "/bin/ip addr add fec0::15/64 dev eth0",
                "/bin/ip -4 route add default via 10.0.2.2 dev eth0"
            ]
        );
    }

    #[test]
    fn bad_setup_values_are_named() {
        let mut spec = SystemSpec::default();
        spec.setup.dirs.push(DirSpec {
            path: "rel".into(),
            mode: "0755".into(),
            user: None,
            group: None,
        });
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "setup.dirs[0].path: 'rel' is not an absolute path without '..'"
        );
        let mut spec = SystemSpec::default();
        spec.setup.dirs.push(DirSpec {
            path: "/x".into(),
            mode: "999".into(),
            user: None,
            group: None,
        });
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "setup.dirs[0].mode: '999' is not an octal mode"
        );
    }

    fn user(uid: Option<u32>, password: Option<&str>) -> UserSpec {
        UserSpec {
            uid,
            group: None,
            home: None,
            shell: None,
            password: password.map(String::from),
        }
    }

    #[test]
    fn passwords_and_root_defaults() {
        let mut spec = SystemSpec::default();
        spec.users.insert("root".into(), user(None, Some("empty")));
        let sys = validate(&spec, "h", &all_exist).unwrap();
        let root = sys.users.iter().find(|u| u.name == "root").unwrap();
        assert_eq!(
            (root.uid, root.home.as_str(), root.shell.as_str()),
            (0, "/root", "/bin/sh")
        );
        assert_eq!(root.password, Password::Empty);
        assert_eq!(root.password.shadow_field(), "");
        assert_eq!(Password::Locked.shadow_field(), "*");
        assert_eq!(
            Password::parse("$6$salt$hash", "k").unwrap().shadow_field(),
            "$6$salt$hash"
        );
        for bad in ["hunter2", "$6$a:b", ""] {
            assert!(Password::parse(bad, "users.x.password").is_err(), "{bad}");
        }
        let mut spec = SystemSpec::default();
        spec.groups.insert("app".into(), GroupSpec { gid: 1000 });
        spec.users.insert("app".into(), user(None, None));
        assert_eq!(
            validate(&spec, "h", &all_exist).unwrap_err(),
            "users.app.uid: missing (every user but root needs one)"
        );
    }
}
