//! A client for QEMU's machine protocol (QMP) on a Unix socket.
//!
//! The device suite's hotplug rows add and remove devices while the guest runs: QEMU is started
//! with `-qmp unix:<path>,server=on,wait=off` ([`qmp_args`]) and the host connects with
//! [`Qmp::connect`]. The protocol is JSON, one object per line:
//!
//! ```text
//! <- {"QMP": {"version": {...}, "capabilities": [...]}}     the greeting
//! -> {"execute": "qmp_capabilities"}                        leaves negotiation mode
//! <- {"return": {}}
//! -> {"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", ...}}
//! <- {"return": {}}                                         or {"error": {"class", "desc"}}
//! <- {"event": "DEVICE_DELETED", "data": {...}, "timestamp": {...}}   at any time
//! ```
//!
//! Events may arrive before a command's answer; [`Qmp::execute`] keeps them, and
//! [`Qmp::wait_event`] looks at the kept ones first. `device_del` only asks the guest to let
//! go of a device: it is gone when `DEVICE_DELETED` names it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QEMU's QMP socket {}: {error}", path.display())]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: QEMU closed the socket")]
    Closed,
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: no {0} event within {1:?}")]
    NoEvent(String, Duration),
}

/// The arguments that give QEMU a QMP server on `path` (QEMU does not wait for a client).
pub fn qmp_args(path: &Path) -> Vec<String> {
    vec![
        "-qmp".to_string(),
        format!(
            "unix:{},server=on,wait=off",
            path.display().to_string().replace(',', ",,")
        ),
    ]
}

/// One QMP session, past capability negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a command's answer, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout` passes (QEMU makes the socket as it
    /// starts), reads the greeting and leaves negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(error) if start.elapsed() >= timeout => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        error,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else if let Some(value) = message.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = message.get("error") {
                let field = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            } else {
                return Err(QmpError::Protocol(format!(
                    "unexpected answer to {command}: {message}"
                )));
            }
        }
    }

    /// Waits up to `timeout` for an event named `name` whose `data` has every field of
    /// `data_matches` (an object), and returns the whole event.
    pub fn wait_event(
        &mut self,
        name: &str,
        data_matches: &Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let matches = |event: &Value| {
            event.get("event").and_then(Value::as_str) == Some(name)
                && data_matches.as_object().is_none_or(|want| {
                    want.iter().all(|(key, value)| {
                        event.get("data").and_then(|d| d.get(key)) == Some(value)
                    })
                })
        };
        if let Some(at) = self.events.iter().position(matches) {
            return Ok(self.events.remove(at));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::NoEvent(name.to_string(), timeout));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let message = match self.read_message() {
                Ok(message) => message,
                Err(QmpError::Io(error))
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::NoEvent(name.to_string(), timeout))
                }
                Err(other) => return Err(other),
            };
            if matches(&message) {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.events.push(message);
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(line.trim_end())
            .map_err(|error| QmpError::Protocol(format!("not JSON ({error}): {}", line.trim_end())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A client connected to a QMP server that greets, accepts `qmp_capabilities`, then
    /// answers each request with the next of `answers` (each a list of lines to send) and
    /// records every request until the client closes.
    fn connected(
        answers: Vec<Vec<&'static str>>,
    ) -> (tempfile::TempDir, Qmp, thread::JoinHandle<Vec<Value>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let answers: Vec<Vec<&str>> = std::iter::once(vec![r#"{"return": {}}"#])
            .chain(answers)
            .collect();
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n")
                .unwrap();
            let mut seen = Vec::new();
            for lines in answers {
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap() == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&request).unwrap());
                for line in lines {
                    writer.write_all(line.as_bytes()).unwrap();
                    writer.write_all(b"\r\n").unwrap();
                }
            }
            // Hold the socket open, as QEMU does, until the client goes.
            let mut rest = String::new();
            while reader.read_line(&mut rest).unwrap_or(0) > 0 {}
            seen
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        (dir, qmp, handle)
    }

    fn hp0_deleted(qmp: &mut Qmp, millis: u64) -> Result<Value, QmpError> {
        let data = json!({ "device": "hp0" });
        qmp.wait_event("DEVICE_DELETED", &data, Duration::from_millis(millis))
    }

    #[test]
    fn negotiates_then_runs_a_command_keeping_early_events() {
        let (_dir, mut qmp, server) = connected(vec![vec![
            r#"{"event": "DEVICE_DELETED", "data": {"device": "hp0"}, "timestamp": {}}"#,
            r#"{"return": {}}"#,
        ]]);
        let answer = qmp.execute("device_del", json!({ "id": "hp0" })).unwrap();
        assert_eq!(answer, json!({}));
        // The event came before the answer and is found without reading more.
        let event = hp0_deleted(&mut qmp, 10).unwrap();
        assert_eq!(event["data"]["device"], "hp0");
        drop(qmp);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            vec![
                json!({ "execute": "qmp_capabilities" }),
                json!({ "execute": "device_del", "arguments": { "id": "hp0" } }),
            ]
        );
    }

    #[test]
    fn a_command_error_names_the_command_class_and_text() {
        let (_dir, mut qmp, _server) = connected(vec![vec![
            r#"{"error": {"class": "GenericError", "desc": "Bus 'hp' not found"}}"#,
        ]]);
        let error = qmp
            .execute(
                "device_add",
                json!({ "driver": "virtio-blk-pci", "bus": "hp" }),
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "QMP device_add failed: GenericError: Bus 'hp' not found"
        );
    }

    #[test]
    fn an_event_for_another_device_does_not_count() {
        let (_dir, mut qmp, _server) = connected(vec![vec![
            r#"{"return": {}}"#,
            r#"{"event": "DEVICE_DELETED", "data": {"device": "other"}, "timestamp": {}}"#,
        ]]);
        qmp.execute("device_del", json!({ "id": "hp0" })).unwrap();
        let error = hp0_deleted(&mut qmp, 300).unwrap_err();
        assert!(matches!(error, QmpError::NoEvent(..)), "{error}");
    }

    #[test]
    fn no_socket_is_a_connect_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let Err(error) = Qmp::connect(&path, Duration::from_millis(100)) else {
            panic!("connected to nothing");
        };
        assert!(error.to_string().contains("absent.sock"), "{error}");
    }

    #[test]
    fn qmp_args_escape_commas() {
        assert_eq!(
            qmp_args(Path::new("/tmp/a,b/qmp.sock")),
            ["-qmp", "unix:/tmp/a,,b/qmp.sock,server=on,wait=off"]
        );
    }
}
