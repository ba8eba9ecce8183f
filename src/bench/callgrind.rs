//! Machine instructions per request, counted by valgrind's callgrind: the
//! `instructions` suite's counter and its report.
//!
//! CPU time per request swings by ±20–40 % between identical runs on a shared
//! two-core machine (findings.md), so a few µs of host calls cannot be seen in
//! it. Instructions executed by Envoy (and by the picker, for ext_proc) are a
//! count: two runs of the same binaries agree within a fraction of a percent.
//! They are not time (a cache miss costs no instruction), so they complement
//! the overhead suite's CPU figures, they do not replace them.
//!
//! How: the process runs under `valgrind --tool=callgrind` with instrumentation
//! off (start-up runs at near native speed, nothing is counted); around the
//! measured requests the harness turns it on, zeroes the counters, and dumps
//! them (`callgrind_control`), then reads the dump's `summary:` line. V8
//! compiles the Wasm module at run time: `--smc-check=all-non-file` makes
//! valgrind see the generated code.

use super::report::{human_bytes, thousands, RunMeta};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `program args…` under callgrind, instrumentation off, dumps in `dir`.
pub fn wrap(program: &Path, args: &[String], dir: &Path) -> Command {
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg("--instr-atstart=no")
        .arg("--smc-check=all-non-file")
        .arg(format!(
            "--callgrind-out-file={}",
            dir.join("callgrind.%p").display()
        ))
        .arg(program)
        .args(args);
    cmd
}

/// Whether valgrind and callgrind_control are installed.
pub fn available() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// One process running under [`wrap`].
pub struct Counter {
    pid: u32,
    dir: PathBuf,
}

impl Counter {
    pub fn new(pid: u32, dir: &Path) -> Counter {
        Counter {
            pid,
            dir: dir.to_path_buf(),
        }
    }

    fn control(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("callgrind_control")
            .args(args)
            .arg(self.pid.to_string())
            .output()
            .map_err(|e| format!("callgrind_control: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("OK") {
            Ok(())
        } else {
            Err(format!(
                "callgrind_control {args:?} {}: {text}{}",
                self.pid,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Instrumentation on (valgrind re-translates the code it runs: let some
    /// requests pass before [`Counter::zero`]).
    pub fn instrument(&self, on: bool) -> Result<(), String> {
        self.control(&["-i", if on { "on" } else { "off" }])
    }

    pub fn zero(&self) -> Result<(), String> {
        self.control(&["-z"])
    }

    /// Instructions since the last [`Counter::zero`]: dumps and reads the dump.
    pub fn dump(&self) -> Result<u64, String> {
        self.control(&["-d"])?;
        // Dumps are numbered `callgrind.<pid>.<n>`: the newest one is ours.
        let prefix = format!("callgrind.{}.", self.pid);
        let newest = std::fs::read_dir(&self.dir)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, e.path()))
            })
            .max_by_key(|(n, _)| *n)
            .ok_or_else(|| format!("no callgrind dump for pid {}", self.pid))?;
        let text = std::fs::read_to_string(&newest.1).map_err(|e| e.to_string())?;
        summary(&text).ok_or_else(|| format!("{}: no summary line", newest.1.display()))
    }
}

/// The `summary: <Ir>` line of a callgrind dump (one event, `Ir`).
pub fn summary(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// One counted point: a variant at a pool size and a body size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstructionRow {
    pub variant: String,
    pub endpoints: usize,
    pub body_bytes: usize,
    /// Requests counted (all answered 2xx).
    pub requests: u64,
    /// Envoy's instructions per request.
    pub envoy: u64,
    /// The picker's (ext_proc variants), else 0.
    pub picker: u64,
}

impl InstructionRow {
    pub fn total(&self) -> u64 {
        self.envoy + self.picker
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstructionResults {
    pub meta: RunMeta,
    pub method: String,
    pub rows: Vec<InstructionRow>,
}

/// The BENCHMARKS.md section: one table per body size, with each variant's
/// multiple of plain Envoy's count.
pub fn section(r: &InstructionResults) -> String {
    let mut o = super::report::meta_block(&r.meta);
    let _ = writeln!(o, "{}\n", r.method);
    let mut bodies: Vec<usize> = r.rows.iter().map(|x| x.body_bytes).collect();
    bodies.sort_unstable();
    bodies.dedup();
    for body in bodies {
        let rows: Vec<&InstructionRow> = r.rows.iter().filter(|x| x.body_bytes == body).collect();
        let plain = rows
            .iter()
            .find(|x| x.variant == "plain")
            .map(|x| x.total());
        let floor = rows
            .iter()
            .find(|x| x.variant == "floor")
            .map(|x| x.total());
        let _ = writeln!(o, "Body {}:\n", human_bytes(body));
        o.push_str("| variant | endpoints | Envoy | picker | total | × plain | × floor |\n");
        o.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for x in rows {
            let times = |base: Option<u64>| match base {
                Some(b) if b > 0 => format!("{:.2}×", x.total() as f64 / b as f64),
                _ => "–".into(),
            };
            let picker = if x.picker > 0 {
                thousands(x.picker)
            } else {
                "–".into()
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                x.variant,
                if x.endpoints == 0 {
                    "–".into()
                } else {
                    x.endpoints.to_string()
                },
                thousands(x.envoy),
                picker,
                thousands(x.total()),
                times(plain),
                times(floor),
            );
        }
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_of_a_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\npid: 24399\ncmd: envoy\npart: 2\n\n\
                    positions: line\nevents: Ir\nsummary: 148414641\n\n\nfl=(1) ???\n";
        assert_eq!(summary(dump), Some(148_414_641));
        assert_eq!(summary("events: Ir\nsummary: \n"), None);
        assert_eq!(summary("events: Ir\n"), None);
    }
}
