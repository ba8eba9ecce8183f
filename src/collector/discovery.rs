//! Pure discovery logic, no I/O: endpoints files and push target files (their
//! format and the entries they may hold), the expansion of push targets over DNS
//! answers, how a DNS answer updates what is known, and the change detection of
//! a polled file. The async shell that reads files and asks DNS is `runtime.rs`.

use super::aggregate::Target;
use super::config::{
    expand_ports, parse_address, parse_push_entry, Host, PoolSpec, PushEntry, RawEndpoint, Source,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// An endpoints or push target file larger than this is an error (a list of
/// addresses is far smaller; this only keeps a wrong mount from eating memory).
pub const MAX_DISCOVERY_FILE_BYTES: usize = 4 * 1024 * 1024;

/// What a file gave: its usable entries, and one warning per refused entry
/// (naming the entry).
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntries<T> {
    pub entries: Vec<T>,
    pub refused: Vec<String>,
}

impl<T> Default for FileEntries<T> {
    fn default() -> Self {
        FileEntries {
            entries: Vec::new(),
            refused: Vec::new(),
        }
    }
}

fn deserialize_list<T: for<'de> Deserialize<'de>>(
    text: &str,
    json: bool,
) -> Result<Vec<T>, String> {
    // An empty file is an empty list (no members), like `[]`.
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let located = |path: String, e: String| {
        if path.is_empty() || path == "." {
            e
        } else {
            format!("{path}: {e}")
        }
    };
    if json {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| located(e.path().to_string(), e.into_inner().to_string()))
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| located(e.path().to_string(), e.into_inner().to_string()))
    }
}

/// An endpoints file: a YAML (or JSON, `json`) list of entries shaped like
/// `pools[].endpoints` entries (`"ip:port"`, `"ip"` with the pool's
/// target_ports, or `{address, server_type, labels}`), IP addresses only.
///
/// A file that is not such a list is an error (the caller keeps the previous
/// members). An entry with a DNS name, no port and no target_ports, port 0 or a
/// bad label name is refused, with a warning naming it; the others are used.
/// Entries take the pool's server type and labels as defaults, like
/// configured endpoints; an address listed twice is kept once (first wins).
pub fn parse_endpoints_file(
    text: &str,
    json: bool,
    pool: &PoolSpec,
) -> Result<FileEntries<Target>, String> {
    let raw: Vec<RawEndpoint> = deserialize_list(text, json)?;
    let mut out = FileEntries::default();
    for (i, e) in raw.iter().enumerate() {
        let refuse = |why: String| format!("entry [{i}] '{}': {why}", e.address);
        let address = match parse_address(&e.address) {
            Ok(a) => a,
            Err(m) => {
                out.refused.push(refuse(m));
                continue;
            }
        };
        if let Host::Name(_) = address.host {
            out.refused.push(refuse(
                "a DNS name; an endpoints file lists IP addresses only".into(),
            ));
            continue;
        }
        let Some(sources) = expand_ports(&address, &pool.target_ports) else {
            out.refused
                .push(refuse("no port, and the pool has no target_ports".into()));
            continue;
        };
        if let Some(bad) = e.labels.keys().find(|k| !is_label_name(k)) {
            out.refused.push(refuse(format!(
                "label name '{bad}' is not a Kubernetes label key ([prefix/]name, e.g. gke.io/zone)"
            )));
            continue;
        }
        let mut labels: BTreeMap<String, String> = pool.labels.clone();
        labels.extend(e.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        let labels: Vec<(String, String)> = labels.into_iter().collect();
        for source in sources {
            let Source::Static(address) = source else {
                continue;
            };
            if out.entries.iter().all(|t: &Target| t.address != address) {
                out.entries.push(Target {
                    address,
                    server_type: e.server_type.unwrap_or(pool.server_type),
                    labels: labels.clone(),
                });
            }
        }
    }
    Ok(out)
}

fn is_label_name(k: &str) -> bool {
    super::config::is_label_key(k)
}

/// A push target file: a YAML (or JSON) list of strings, each like a
/// `push_targets` entry (`ip:port`, `host:port`, `http://host:port/path`; DNS
/// names allowed). Not a list of strings: an error. A string that is not a
/// valid entry is refused with a warning naming it.
pub fn parse_push_targets_file(text: &str, json: bool) -> Result<FileEntries<PushEntry>, String> {
    let raw: Vec<String> = deserialize_list(text, json)?;
    let mut out = FileEntries::default();
    for (i, t) in raw.iter().enumerate() {
        match parse_push_entry(t) {
            Ok(e) => {
                if !out.entries.iter().any(|x: &PushEntry| x.name == e.name) {
                    out.entries.push(e);
                }
            }
            Err(m) => out.refused.push(format!("entry [{i}] '{t}': {m}")),
        }
    }
    Ok(out)
}

/// One concrete push destination: an address that one pusher task feeds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PushAddress {
    /// The entry as written (the `target` label).
    pub name: String,
    /// The address pushed to (the `address` label).
    pub address: SocketAddr,
    /// `http://address/path`.
    pub url: String,
}

/// Every concrete push destination of `entries`: an IP entry is one, a DNS
/// entry one per address of its answer (none before the first answer). The
/// same URL from several entries is pushed to once (first entry's name).
pub fn expand_push_targets(
    entries: &[PushEntry],
    dns: &HashMap<String, Vec<IpAddr>>,
) -> Vec<PushAddress> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for e in entries {
        let ips: Vec<IpAddr> = match &e.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(n) => dns.get(n).cloned().unwrap_or_default(),
        };
        for ip in ips {
            let url = e.url_for(ip);
            if seen.insert(url.clone()) {
                out.push(PushAddress {
                    name: e.name.clone(),
                    address: SocketAddr::new(ip, e.port),
                    url,
                });
            }
        }
    }
    out
}

/// The outcome of asking DNS for one record type (A or AAAA) of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsOutcome {
    /// Records (possibly none after filtering).
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN, or an answer without records of the type: the name has no
    /// addresses (a headless Service without ready pods publishes none).
    Empty,
    /// Network error, timeout, SERVFAIL, refusal...: nothing is known.
    Failed(String),
}

/// The addresses of a name from its A and AAAA outcomes: `Some(sorted,
/// deduplicated addresses)` (empty when both are empty), or `None` when either
/// failed, so the caller keeps the previous answer rather than dropping the
/// members the failed half would have listed.
pub fn combine_dns(outcomes: &[DnsOutcome]) -> Option<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for o in outcomes {
        match o {
            DnsOutcome::Addresses(a) => ips.extend_from_slice(a),
            DnsOutcome::Empty => {}
            DnsOutcome::Failed(_) => return None,
        }
    }
    ips.sort();
    ips.dedup();
    Some(ips)
}

/// Change detection of a polled file, by content (a ConfigMap update swaps a
/// symlink, so modification times alone are not enough).
#[derive(Debug, Clone, Default)]
pub struct FileWatch {
    /// The last content read, or the last read error.
    last: Option<Result<String, String>>,
}

/// What one poll of a file means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Same content as last time: nothing to do.
    Same,
    /// New content (or readable again): parse it.
    Changed(String),
    /// Unreadable (missing, permissions, too large); `first` when this error is
    /// new (log and count it once per change of state).
    Failed { message: String, first: bool },
}

impl FileWatch {
    pub fn observe(&mut self, read: Result<String, String>) -> Observed {
        match (&self.last, read) {
            (Some(Ok(prev)), Ok(text)) if *prev == text => Observed::Same,
            (_, Ok(text)) => {
                self.last = Some(Ok(text.clone()));
                Observed::Changed(text)
            }
            (Some(Err(prev)), Err(message)) if *prev == message => Observed::Failed {
                message,
                first: false,
            },
            (_, Err(message)) => {
                self.last = Some(Err(message.clone()));
                Observed::Failed {
                    message,
                    first: true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::config::{CollectorConfig, ServerType};

    fn pool(yaml_pool: &str) -> PoolSpec {
        let text = format!("pools: [{yaml_pool}]");
        CollectorConfig::parse(&text, false, |_| None)
            .unwrap_or_else(|e| panic!("{e}"))
            .pools
            .remove(0)
    }

    fn addrs(t: &[Target]) -> Vec<String> {
        t.iter().map(|t| t.address.to_string()).collect()
    }

    #[test]
    fn endpoints_file_entries_and_refusals() {
        let p = pool(
            "{name: p, server_type: sglang, labels: {zone: a}, target_ports: [8000, 8001], endpoints_file: /x}",
        );
        let text = r#"
- "10.0.0.1:9000"
- "10.0.0.2"
- "[fd00::1]"
- "fd00::2"
- {address: "10.0.0.3:80", server_type: tgi, labels: {zone: b, rack: r1}}
- "vllm.default.svc:8000"
- "vllm.default.svc"
- "10.0.0.4:0"
- {address: "10.0.0.5:1", labels: {"bad name": x}}
- "10.0.0.1:9000"
"#;
        let f = parse_endpoints_file(text, false, &p).unwrap();
        assert_eq!(
            addrs(&f.entries),
            [
                "10.0.0.1:9000",
                "10.0.0.2:8000",
                "10.0.0.2:8001",
                "[fd00::1]:8000",
                "[fd00::1]:8001",
                "[fd00::2]:8000",
                "[fd00::2]:8001",
                "10.0.0.3:80"
            ]
        );
        assert_eq!(f.entries[0].server_type, ServerType::Sglang);
        assert_eq!(f.entries[0].labels, vec![("zone".into(), "a".into())]);
        let t = &f.entries[7];
        assert_eq!(t.server_type, ServerType::Tgi);
        assert_eq!(
            t.labels,
            vec![("rack".into(), "r1".into()), ("zone".into(), "b".into())]
        );
        assert_eq!(f.refused.len(), 4, "{:#?}", f.refused);
        assert!(f.refused[0].starts_with("entry [5] 'vllm.default.svc:8000': a DNS name"));
        assert!(f.refused[1].starts_with("entry [6] 'vllm.default.svc'"));
        assert!(f.refused[2].contains("entry [7]") && f.refused[2].contains("port 0"));
        assert!(f.refused[3].contains("entry [8]") && f.refused[3].contains("bad name"));

        // Without target ports a port-less IP is refused, naming the entry.
        let q = pool("{name: q, endpoints_file: /x}");
        let f = parse_endpoints_file("[\"10.0.0.9\", \"10.0.0.9:1\"]", false, &q).unwrap();
        assert_eq!(addrs(&f.entries), ["10.0.0.9:1"]);
        assert_eq!(
            f.refused,
            ["entry [0] '10.0.0.9': no port, and the pool has no target_ports"]
        );
    }

    #[test]
    fn endpoints_file_formats_and_errors() {
        let p = pool("{name: p, endpoints_file: /x}");
        for empty in ["", "  \n", "[]", "[]\n"] {
            let f = parse_endpoints_file(empty, false, &p).unwrap();
            assert!(f.entries.is_empty() && f.refused.is_empty(), "{empty:?}");
        }
        let f = parse_endpoints_file(
            r#"["127.0.0.1:1", {"address": "127.0.0.2:2", "server_type": "llamacpp"}]"#,
            true,
            &p,
        )
        .unwrap();
        assert_eq!(addrs(&f.entries), ["127.0.0.1:1", "127.0.0.2:2"]);
        assert_eq!(f.entries[1].server_type, ServerType::Llamacpp);
        for bad in [
            "- [unterminated",
            "{address: '127.0.0.1:1'}",
            "- {address: '127.0.0.1:1', colour: red}",
            "- {address: '127.0.0.1:1', server_type: vlm}",
            "- 42",
            "just text",
        ] {
            assert!(parse_endpoints_file(bad, false, &p).is_err(), "{bad}");
        }
        let e = parse_endpoints_file("- {address: '127.0.0.1:1', server_type: vlm}", false, &p)
            .unwrap_err();
        assert!(e.starts_with("[0].server_type: "), "{e}");
        assert!(parse_endpoints_file("[\"127.0.0.1:1\"", true, &p).is_err());
        // Junk never panics.
        for junk in ["\u{0}", "- !!binary x", "&a [*a]", "{", "- ]", "[[[[[[[[[["] {
            let _ = parse_endpoints_file(junk, false, &p);
            let _ = parse_endpoints_file(junk, true, &p);
            let _ = parse_push_targets_file(junk, false);
        }
    }

    #[test]
    fn push_target_files_and_expansion() {
        let f = parse_push_targets_file(
            "- \"127.0.0.1:9902\"\n- \"envoy-gw.ns.svc:10001\"\n- \"http://[::1]:9903/custom\"\n- \"https://x:1\"\n- \"nope\"\n",
            false,
        )
        .unwrap();
        assert_eq!(f.entries.len(), 3);
        assert_eq!(f.refused.len(), 2, "{:?}", f.refused);
        assert!(f.refused[0].starts_with("entry [3] 'https://x:1': https"));
        assert!(f.refused[1].starts_with("entry [4] 'nope'"));
        assert!(parse_push_targets_file("- {file: /x}", false).is_err());

        let mut dns = HashMap::new();
        let before = expand_push_targets(&f.entries, &dns);
        assert_eq!(
            before.iter().map(|p| p.url.as_str()).collect::<Vec<_>>(),
            [
                "http://127.0.0.1:9902/v1/snapshot",
                "http://[::1]:9903/custom"
            ],
            "a name without an answer has no targets yet"
        );
        dns.insert(
            "envoy-gw.ns.svc".to_string(),
            vec!["10.0.0.5".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        );
        let after = expand_push_targets(&f.entries, &dns);
        let got: Vec<(&str, String, &str)> = after
            .iter()
            .map(|p| (p.name.as_str(), p.address.to_string(), p.url.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "127.0.0.1:9902",
                    "127.0.0.1:9902".to_string(),
                    "http://127.0.0.1:9902/v1/snapshot"
                ),
                (
                    "envoy-gw.ns.svc:10001",
                    "10.0.0.5:10001".to_string(),
                    "http://10.0.0.5:10001/v1/snapshot"
                ),
                (
                    "envoy-gw.ns.svc:10001",
                    "127.0.0.1:10001".to_string(),
                    "http://127.0.0.1:10001/v1/snapshot"
                ),
                (
                    "http://[::1]:9903/custom",
                    "[::1]:9903".to_string(),
                    "http://[::1]:9903/custom"
                ),
            ]
        );
        // The same URL through two entries is one target (the first entry's).
        let twice = [
            parse_push_entry("127.0.0.1:10001").unwrap(),
            parse_push_entry("envoy-gw.ns.svc:10001").unwrap(),
        ];
        let t = expand_push_targets(&twice, &dns);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "127.0.0.1:10001");
    }

    #[test]
    fn dns_outcomes() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        use DnsOutcome::*;
        assert_eq!(
            combine_dns(&[
                Addresses(vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.2")]),
                Addresses(vec![ip("fd00::1")])
            ]),
            Some(vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("fd00::1")])
        );
        assert_eq!(
            combine_dns(&[Addresses(vec![ip("10.0.0.1")]), Empty]),
            Some(vec![ip("10.0.0.1")])
        );
        assert_eq!(
            combine_dns(&[Empty, Empty]),
            Some(vec![]),
            "NXDOMAIN / no records: zero members"
        );
        assert_eq!(
            combine_dns(&[Addresses(vec![ip("10.0.0.1")]), Failed("timeout".into())]),
            None,
            "a failed half keeps the previous answer"
        );
        assert_eq!(combine_dns(&[Failed("x".into()), Empty]), None);
    }

    #[test]
    fn file_watch_compares_content_and_reports_state_changes() {
        let mut w = FileWatch::default();
        let missing = || Err("No such file or directory".to_string());
        assert_eq!(
            w.observe(missing()),
            Observed::Failed {
                message: "No such file or directory".into(),
                first: true
            }
        );
        assert!(matches!(
            w.observe(missing()),
            Observed::Failed { first: false, .. }
        ));
        assert_eq!(w.observe(Ok("a".into())), Observed::Changed("a".into()));
        assert_eq!(w.observe(Ok("a".into())), Observed::Same);
        assert_eq!(w.observe(Ok("b".into())), Observed::Changed("b".into()));
        assert!(matches!(
            w.observe(missing()),
            Observed::Failed { first: true, .. }
        ));
        assert_eq!(
            w.observe(Ok("b".into())),
            Observed::Changed("b".into()),
            "readable again: parsed again"
        );
    }
}
