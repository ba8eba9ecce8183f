//! The collector's configuration file (YAML or JSON): serde types, then one
//! validation pass whose errors name the field, e.g.
//! `pools[1].endpoints[0]: not ip:port or host:port`. Every field is documented in
//! `docs/collector.md`.

use crate::config::ConfigError;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The model-server flavours the collector knows how to read (see `mapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
pub enum ServerType {
    #[default]
    #[serde(rename = "vllm")]
    Vllm,
    #[serde(rename = "sglang")]
    Sglang,
    #[serde(rename = "tgi")]
    Tgi,
    #[serde(rename = "triton-trtllm")]
    TritonTrtllm,
    #[serde(rename = "llamacpp")]
    Llamacpp,
}

impl ServerType {
    pub const ALL: [ServerType; 5] = [
        ServerType::Vllm,
        ServerType::Sglang,
        ServerType::Tgi,
        ServerType::TritonTrtllm,
        ServerType::Llamacpp,
    ];

    /// The name used in the configuration and in the snapshot.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerType::Vllm => "vllm",
            ServerType::Sglang => "sglang",
            ServerType::Tgi => "tgi",
            ServerType::TritonTrtllm => "triton-trtllm",
            ServerType::Llamacpp => "llamacpp",
        }
    }
}

impl fmt::Display for ServerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const DEFAULT_SCRAPE_INTERVAL_MS: u64 = 50;
pub const DEFAULT_SCRAPE_TIMEOUT_MS: u64 = 500;
pub const DEFAULT_DNS_REFRESH_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_PUSH_TIMEOUT_MS: u64 = 1_000;
pub const DEFAULT_PUSH_BACKOFF_INITIAL_MS: u64 = 100;
pub const DEFAULT_PUSH_BACKOFF_MAX_MS: u64 = 2_000;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_ENDPOINTS_FILE_POLL_INTERVAL_MS: u64 = 1_000;
/// The filter rejects shorter ingest tokens, so a shorter one here can never work.
pub const MIN_TOKEN_LEN: usize = 8;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCollectorConfig {
    #[serde(default = "d_scrape_interval")]
    pub scrape_interval_ms: u64,
    #[serde(default = "d_scrape_timeout")]
    pub scrape_timeout_ms: u64,
    #[serde(default = "d_dns_refresh")]
    pub dns_refresh_interval_ms: u64,
    /// DNS servers (`ip:port`) that DNS sources are resolved against; empty: the
    /// system resolver (getaddrinfo, with resolv.conf's search domains).
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// How often endpoints files and push target files are read again.
    #[serde(default = "d_file_poll")]
    pub endpoints_file_poll_interval_ms: u64,
    /// Envoy ingest addresses: `ip:port`, `host:port`, `http://host:port[/path]`
    /// or `{file: PATH}`.
    #[serde(default)]
    pub push_targets: Vec<RawPushTarget>,
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable that holds the token.
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default = "d_push_timeout")]
    pub push_timeout_ms: u64,
    #[serde(default = "d_backoff_initial")]
    pub push_backoff_initial_ms: u64,
    #[serde(default = "d_backoff_max")]
    pub push_backoff_max_ms: u64,
    /// The collector's own `/metrics` and `/healthz`.
    #[serde(default = "d_listen")]
    pub listen: String,
    #[serde(default)]
    pub pools: Vec<RawPool>,
}

fn d_scrape_interval() -> u64 {
    DEFAULT_SCRAPE_INTERVAL_MS
}
fn d_scrape_timeout() -> u64 {
    DEFAULT_SCRAPE_TIMEOUT_MS
}
fn d_dns_refresh() -> u64 {
    DEFAULT_DNS_REFRESH_INTERVAL_MS
}
fn d_file_poll() -> u64 {
    DEFAULT_ENDPOINTS_FILE_POLL_INTERVAL_MS
}
fn d_push_timeout() -> u64 {
    DEFAULT_PUSH_TIMEOUT_MS
}
fn d_backoff_initial() -> u64 {
    DEFAULT_PUSH_BACKOFF_INITIAL_MS
}
fn d_backoff_max() -> u64 {
    DEFAULT_PUSH_BACKOFF_MAX_MS
}
fn d_listen() -> String {
    DEFAULT_LISTEN.into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    /// Default for the pool's endpoints.
    #[serde(default)]
    pub server_type: Option<ServerType>,
    /// Labels every endpoint of the pool carries (an endpoint's own labels win).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    /// A file (YAML, or JSON when it ends in `.json`) listing more endpoints,
    /// re-read when it changes.
    #[serde(default)]
    pub endpoints_file: Option<String>,
    /// Ports of an endpoint written without one (InferencePool `targetPorts`).
    #[serde(default)]
    pub target_ports: Vec<u16>,
}

/// A push target: an address or URL, or a file that lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPushTarget {
    Address(String),
    File(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPushTargetFile {
    file: String,
}

impl<'de> Deserialize<'de> for RawPushTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPushTarget;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"ip:port\", \"host:port\", \"http://host:port/path\" or {file: PATH}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPushTarget, E> {
                Ok(RawPushTarget::Address(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawPushTarget, A::Error> {
                let o = RawPushTargetFile::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawPushTarget::File(o.file))
            }
        }
        d.deserialize_any(V)
    }
}

/// An endpoint: either just its address, or an object with labels and a server type.
#[derive(Debug, Clone, Default)]
pub struct RawEndpoint {
    pub address: String,
    pub server_type: Option<ServerType>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointObject {
    address: String,
    #[serde(default)]
    server_type: Option<ServerType>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

// Hand-written rather than `#[serde(untagged)]`, whose only error is "did not match
// any variant": this keeps serde's precise message and the field path.
impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"ip:port\", \"host:port\" or {address, server_type, labels}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint {
                    address: v.to_string(),
                    ..Default::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawEndpoint, A::Error> {
                let o = RawEndpointObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawEndpoint {
                    address: o.address,
                    server_type: o.server_type,
                    labels: o.labels,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorConfig {
    pub scrape_interval: Duration,
    pub scrape_timeout: Duration,
    pub dns_refresh_interval: Duration,
    /// Empty: the system resolver.
    pub dns_servers: Vec<SocketAddr>,
    pub endpoints_file_poll_interval: Duration,
    pub push_targets: Vec<PushTargetSpec>,
    pub token: Option<String>,
    pub push_timeout: Duration,
    pub push_backoff_initial: Duration,
    pub push_backoff_max: Duration,
    pub listen: SocketAddr,
    pub pools: Vec<PoolSpec>,
}

/// A configured push target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushTargetSpec {
    Entry(PushEntry),
    /// A file listing entries, re-read when it changes.
    File(PathBuf),
}

/// One push target entry: an IP, or a DNS name whose every address is a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEntry {
    /// As written (the `target` label of the push counters).
    pub name: String,
    pub host: Host,
    pub port: u16,
    /// The URL path, `/v1/snapshot` unless the entry gave one.
    pub path: String,
}

/// The host part of an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name (lower case, as written otherwise).
    Name(String),
}

/// An address as written: a host, with or without a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: Host,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    /// The configured endpoints, port-less ones expanded over `target_ports`.
    pub endpoints: Vec<EndpointSpec>,
    pub endpoints_file: Option<PathBuf>,
    pub target_ports: Vec<u16>,
    /// Defaults of the endpoints that the file lists.
    pub server_type: ServerType,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub source: Source,
    pub server_type: ServerType,
    /// Pool labels merged with the endpoint's, sorted by key.
    pub labels: Vec<(String, String)>,
}

/// Where an endpoint's addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Static(SocketAddr),
    /// Re-resolved every `dns_refresh_interval`; every address is an endpoint.
    Dns {
        host: String,
        port: u16,
    },
}

impl CollectorConfig {
    /// Parses YAML or JSON (`json`: the file name ends in `.json`; YAML also reads
    /// JSON) and validates. `env` looks up `token_env`.
    pub fn parse(
        text: &str,
        json: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CollectorConfig, ConfigError> {
        RawCollectorConfig::parse(text, json)?.validate(env)
    }

    /// Every DNS name in the configuration (endpoints and push targets written
    /// in it; files add theirs at run time), sorted and deduplicated.
    pub fn dns_sources(&self) -> Vec<String> {
        let endpoints = self
            .pools
            .iter()
            .flat_map(|p| &p.endpoints)
            .filter_map(|e| match &e.source {
                Source::Dns { host, .. } => Some(host.clone()),
                Source::Static(_) => None,
            });
        let targets = self.push_targets.iter().filter_map(|t| match t {
            PushTargetSpec::Entry(PushEntry {
                host: Host::Name(h),
                ..
            }) => Some(h.clone()),
            _ => None,
        });
        let mut out: Vec<String> = endpoints.chain(targets).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether anything needs polling (DNS names or files); static only if not.
    pub fn has_dynamic_sources(&self) -> bool {
        !self.dns_sources().is_empty()
            || self.pools.iter().any(|p| p.endpoints_file.is_some())
            || self
                .push_targets
                .iter()
                .any(|t| matches!(t, PushTargetSpec::File(_)))
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

fn millis(field: &str, v: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    if v < min || v > max {
        return Err(err(field, format!("must be between {min} and {max} (ms)")));
    }
    Ok(Duration::from_millis(v))
}

impl RawCollectorConfig {
    /// Deserializes without validating; errors name the field.
    pub fn parse(text: &str, json: bool) -> Result<RawCollectorConfig, ConfigError> {
        if json {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let field = e.path().to_string();
                err(field, e.into_inner().to_string())
            })
        } else {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let field = e.path().to_string();
                err(field, e.into_inner().to_string())
            })
        }
    }

    /// Reads and deserializes a configuration file (`.json`: JSON, else YAML).
    pub fn load(path: &std::path::Path) -> Result<RawCollectorConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, path.extension().is_some_and(|e| e == "json"))
    }

    pub fn validate(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CollectorConfig, ConfigError> {
        let scrape_interval = millis("scrape_interval_ms", self.scrape_interval_ms, 1, 600_000)?;
        let scrape_timeout = millis("scrape_timeout_ms", self.scrape_timeout_ms, 1, 600_000)?;
        let dns_refresh_interval = millis(
            "dns_refresh_interval_ms",
            self.dns_refresh_interval_ms,
            100,
            86_400_000,
        )?;
        let push_timeout = millis("push_timeout_ms", self.push_timeout_ms, 1, 600_000)?;
        let push_backoff_initial = millis(
            "push_backoff_initial_ms",
            self.push_backoff_initial_ms,
            1,
            600_000,
        )?;
        let push_backoff_max = millis(
            "push_backoff_max_ms",
            self.push_backoff_max_ms,
            1,
            3_600_000,
        )?;
        if push_backoff_max < push_backoff_initial {
            return Err(err(
                "push_backoff_max_ms",
                "must not be less than push_backoff_initial_ms",
            ));
        }
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| err("listen", format!("not ip:port: '{}'", self.listen)))?;

        let endpoints_file_poll_interval = millis(
            "endpoints_file_poll_interval_ms",
            self.endpoints_file_poll_interval_ms,
            50,
            3_600_000,
        )?;
        let mut dns_servers: Vec<SocketAddr> = Vec::with_capacity(self.dns_servers.len());
        for (i, d) in self.dns_servers.iter().enumerate() {
            let at = format!("dns_servers[{i}]");
            let a: SocketAddr = d
                .parse()
                .map_err(|_| err(&at, format!("not ip:port: '{d}' (e.g. \"10.96.0.10:53\")")))?;
            if a.port() == 0 {
                return Err(err(&at, format!("port 0 in '{d}'")));
            }
            if dns_servers.contains(&a) {
                return Err(err(&at, format!("duplicate DNS server '{d}'")));
            }
            dns_servers.push(a);
        }

        let mut push_targets: Vec<PushTargetSpec> = Vec::with_capacity(self.push_targets.len());
        for (i, t) in self.push_targets.iter().enumerate() {
            let at = format!("push_targets[{i}]");
            let spec = match t {
                RawPushTarget::Address(a) => {
                    PushTargetSpec::Entry(parse_push_entry(a).map_err(|m| err(&at, m))?)
                }
                RawPushTarget::File(f) => {
                    if f.trim().is_empty() {
                        return Err(err(format!("{at}.file"), "must be a file path"));
                    }
                    PushTargetSpec::File(PathBuf::from(f))
                }
            };
            let same = |p: &PushTargetSpec| match (p, &spec) {
                (PushTargetSpec::Entry(a), PushTargetSpec::Entry(b)) => {
                    a.host == b.host && a.port == b.port && a.path == b.path
                }
                (a, b) => a == b,
            };
            if push_targets.iter().any(same) {
                let written = match t {
                    RawPushTarget::Address(a) => a.clone(),
                    RawPushTarget::File(f) => format!("file {f}"),
                };
                return Err(err(&at, format!("duplicate target '{written}'")));
            }
            push_targets.push(spec);
        }

        let token = match (&self.token, &self.token_env) {
            (Some(_), Some(_)) => {
                return Err(err("token_env", "set either token or token_env, not both"))
            }
            (Some(t), None) => Some(("token", t.clone())),
            (None, Some(var)) => match env(var) {
                Some(t) => Some(("token_env", t)),
                None => {
                    return Err(err(
                        "token_env",
                        format!("the environment variable {var} is not set"),
                    ))
                }
            },
            (None, None) => None,
        };
        if let Some((field, t)) = &token {
            // It goes into an HTTP header: visible ASCII only.
            if t.len() < MIN_TOKEN_LEN || !t.chars().all(|c| c.is_ascii_graphic()) {
                return Err(err(
                    *field,
                    format!(
                        "the token must be at least {MIN_TOKEN_LEN} visible ASCII characters, without spaces"
                    ),
                ));
            }
        }
        if !push_targets.is_empty() && token.is_none() {
            return Err(err(
                "token",
                "push_targets need a token (token, token_env or --token-env)",
            ));
        }

        if self.pools.is_empty() {
            return Err(err("pools", "at least one pool is required"));
        }
        let mut pools: Vec<PoolSpec> = Vec::with_capacity(self.pools.len());
        // Address → (server type, where), to catch one address configured as two types.
        let mut types: BTreeMap<Source, (ServerType, String)> = BTreeMap::new();
        for (i, p) in self.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            if p.name.trim().is_empty() || p.name.trim() != p.name {
                return Err(err(
                    format!("{at}.name"),
                    "must be non-empty, without surrounding whitespace",
                ));
            }
            if pools.iter().any(|q| q.name == p.name) {
                return Err(err(
                    format!("{at}.name"),
                    format!("duplicate pool '{}'", p.name),
                ));
            }
            check_labels(&p.labels, &format!("{at}.labels"))?;
            let mut target_ports: Vec<u16> = Vec::with_capacity(p.target_ports.len());
            for (k, port) in p.target_ports.iter().enumerate() {
                let at = format!("{at}.target_ports[{k}]");
                if *port == 0 {
                    return Err(err(at, "port 0"));
                }
                if target_ports.contains(port) {
                    return Err(err(at, format!("duplicate port {port}")));
                }
                target_ports.push(*port);
            }
            let endpoints_file = match &p.endpoints_file {
                Some(f) if f.trim().is_empty() => {
                    return Err(err(format!("{at}.endpoints_file"), "must be a file path"))
                }
                Some(f) => Some(PathBuf::from(f)),
                None => None,
            };
            if p.endpoints.is_empty() && endpoints_file.is_none() {
                return Err(err(
                    format!("{at}.endpoints"),
                    "at least one endpoint (or an endpoints_file) is required",
                ));
            }
            let pool_type = p.server_type.unwrap_or_default();
            let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(p.endpoints.len());
            for (j, e) in p.endpoints.iter().enumerate() {
                let ep_at = format!("{at}.endpoints[{j}]");
                let address = parse_address(&e.address).map_err(|m| err(&ep_at, m))?;
                let sources = expand_ports(&address, &target_ports).ok_or_else(|| {
                    err(
                        &ep_at,
                        format!(
                            "'{}' has no port: write host:port, or set {at}.target_ports",
                            e.address
                        ),
                    )
                })?;
                check_labels(&e.labels, &format!("{ep_at}.labels"))?;
                let server_type = e.server_type.unwrap_or(pool_type);
                let mut labels = p.labels.clone();
                labels.extend(e.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                let labels: Vec<(String, String)> = labels.into_iter().collect();
                for source in sources {
                    if endpoints.iter().any(|x| x.source == source) {
                        return Err(err(
                            &ep_at,
                            format!("duplicate endpoint '{source}' in this pool"),
                        ));
                    }
                    match types.get(&source) {
                        Some((t, first)) if *t != server_type => {
                            return Err(err(
                                format!("{ep_at}.server_type"),
                                format!("'{source}' is {t} at {first}, not {server_type}"),
                            ))
                        }
                        Some(_) => {}
                        None => {
                            types.insert(source.clone(), (server_type, ep_at.clone()));
                        }
                    }
                    endpoints.push(EndpointSpec {
                        source,
                        server_type,
                        labels: labels.clone(),
                    });
                }
            }
            pools.push(PoolSpec {
                name: p.name.clone(),
                endpoints,
                endpoints_file,
                target_ports,
                server_type: pool_type,
                labels: p.labels.clone(),
            });
        }

        Ok(CollectorConfig {
            scrape_interval,
            scrape_timeout,
            dns_refresh_interval,
            dns_servers,
            endpoints_file_poll_interval,
            push_targets,
            token: token.map(|(_, t)| t),
            push_timeout,
            push_backoff_initial,
            push_backoff_max,
            listen,
            pools,
        })
    }
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name
/// of at most 63 characters, alphanumeric at both ends with `-`, `_`, `.`
/// between (`zone`, `env`, `gke.io/zone`, `gke.io/cluster-name`): what backend
/// policy selectors match on (docs/backend-policy.md).
pub fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let alnum_ends = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && alnum_ends(name)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && alnum_ends(part)
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
}

fn check_labels(labels: &BTreeMap<String, String>, at: &str) -> Result<(), ConfigError> {
    for k in labels.keys() {
        if !is_label_key(k) {
            return Err(err(
                format!("{at}.{k}"),
                "label keys are Kubernetes label keys: [prefix/]name, e.g. zone or gke.io/zone",
            ));
        }
    }
    Ok(())
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Static(a) => write!(f, "{a}"),
            Source::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// An address with or without a port: `ip:port`, `[v6]:port`, `host:port`, or
/// port-less `ip`, `[v6]`, bare `v6`, `host`. IPv6 with a port needs brackets.
pub fn parse_address(s: &str) -> Result<Address, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("port 0 in '{s}'"));
        }
        return Ok(Address {
            host: Host::Ip(addr.ip()),
            port: Some(addr.port()),
        });
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Address {
            host: Host::Ip(ip),
            port: None,
        });
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<std::net::Ipv6Addr>() {
            return Ok(Address {
                host: Host::Ip(IpAddr::V6(ip)),
                port: None,
            });
        }
    }
    let bad = || format!("not ip:port, host:port, ip or host: '{s}'");
    if let Some((host, port)) = s.rsplit_once(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("port 0 in '{s}'"));
        }
        if !is_hostname(host) {
            return Err(bad());
        }
        return Ok(Address {
            host: Host::Name(host.to_ascii_lowercase()),
            port: Some(port),
        });
    }
    if !is_hostname(s) {
        return Err(bad());
    }
    Ok(Address {
        host: Host::Name(s.to_ascii_lowercase()),
        port: None,
    })
}

/// The sources of an address: itself with its port, or one per target port.
/// `None`: no port and no target ports.
pub fn expand_ports(address: &Address, target_ports: &[u16]) -> Option<Vec<Source>> {
    let ports: Vec<u16> = match address.port {
        Some(p) => vec![p],
        None if target_ports.is_empty() => return None,
        None => target_ports.to_vec(),
    };
    Some(
        ports
            .into_iter()
            .map(|port| match &address.host {
                Host::Ip(ip) => Source::Static(SocketAddr::new(*ip, port)),
                Host::Name(host) => Source::Dns {
                    host: host.clone(),
                    port,
                },
            })
            .collect(),
    )
}

/// `ip:port` (static) or `host:port` (DNS, re-resolved); the port is required.
pub fn parse_source(s: &str) -> Result<Source, String> {
    let a = parse_address(s)?;
    if a.port.is_none() {
        return Err(format!("not ip:port or host:port: '{s}'"));
    }
    expand_ports(&a, &[])
        .and_then(|v| v.into_iter().next())
        .ok_or_else(|| format!("not ip:port or host:port: '{s}'"))
}

/// RFC 1123 host name, and not something that merely looks like a broken IP.
fn is_hostname(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && !h.chars().all(|c| c.is_ascii_digit() || c == '.')
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A push target entry: `ip:port`, `host:port` or `http://host:port[/path]`
/// (the port is required; `https` is refused).
pub fn parse_push_entry(t: &str) -> Result<PushEntry, String> {
    if t.starts_with("https://") {
        return Err("https is not supported: push to the loopback control listener".into());
    }
    let rest = t.strip_prefix("http://").unwrap_or(t);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, crate::ingest::INGEST_PATH),
    };
    let bad = || format!("not ip:port, host:port or http://host:port[/path]: '{t}'");
    let address = parse_address(authority).map_err(|_| bad())?;
    let port = address.port.ok_or_else(bad)?;
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    Ok(PushEntry {
        name: t.to_string(),
        host: address.host,
        port,
        path: path.to_string(),
    })
}

impl PushEntry {
    /// The URL pushes to `ip` go to.
    pub fn url_for(&self, ip: IpAddr) -> String {
        format!("http://{}{}", SocketAddr::new(ip, self.port), self.path)
    }
}

#[cfg(test)]
mod label_key_tests {
    use super::is_label_key;

    #[test]
    fn kubernetes_label_keys_are_accepted() {
        for ok in [
            "zone",
            "env",
            "gke.io/zone",
            "gke.io/cluster-name",
            "a_b.c-d",
            "x9",
        ] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "bad key",
            "-a",
            "a-",
            "/a",
            "gke.io/",
            "Gke.io/a",
            "a/b/c",
            &"a".repeat(64),
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_yaml(s: &str) -> Result<CollectorConfig, ConfigError> {
        CollectorConfig::parse(s, false, no_env)
    }

    fn field_of(s: &str) -> String {
        match parse_yaml(s) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.field,
        }
    }

    const MINIMAL: &str = "pools: [{name: main, endpoints: ['127.0.0.1:8000']}]\n";

    #[test]
    fn defaults() {
        let c = parse_yaml(MINIMAL).unwrap();
        assert_eq!(c.scrape_interval, Duration::from_millis(50));
        assert_eq!(c.scrape_timeout, Duration::from_millis(500));
        assert_eq!(c.dns_refresh_interval, Duration::from_secs(5));
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(c.push_targets.is_empty() && c.token.is_none());
        let ep = &c.pools[0].endpoints[0];
        assert_eq!(ep.server_type, ServerType::Vllm);
        assert_eq!(ep.source, Source::Static("127.0.0.1:8000".parse().unwrap()));
    }

    #[test]
    fn full_yaml_and_json() {
        let yaml = r#"
scrape_interval_ms: 100
scrape_timeout_ms: 80
dns_refresh_interval_ms: 1000
push_targets: ["127.0.0.1:9902", "http://[::1]:9903/custom"]
token: "0123456789"
push_timeout_ms: 300
listen: "0.0.0.0:9100"
pools:
  - name: main
    server_type: sglang
    labels: {cluster: c1, region: eu}
    endpoints:
      - "10.0.0.1:8000"
      - {address: "vllm.svc.cluster.local:8000", server_type: vllm, labels: {zone: a, region: us}}
"#;
        let c = parse_yaml(yaml).unwrap();
        assert_eq!(c.scrape_interval, Duration::from_millis(100));
        let entry = |i: usize| match &c.push_targets[i] {
            PushTargetSpec::Entry(e) => e.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            entry(0).url_for("127.0.0.1".parse().unwrap()),
            "http://127.0.0.1:9902/v1/snapshot"
        );
        assert_eq!(entry(1).host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            entry(1).url_for("::1".parse().unwrap()),
            "http://[::1]:9903/custom"
        );
        assert_eq!(c.token.as_deref(), Some("0123456789"));
        let eps = &c.pools[0].endpoints;
        assert_eq!(eps[0].server_type, ServerType::Sglang);
        assert_eq!(
            eps[0].labels,
            vec![
                ("cluster".into(), "c1".into()),
                ("region".into(), "eu".into())
            ]
        );
        assert_eq!(eps[1].server_type, ServerType::Vllm);
        assert_eq!(
            eps[1].source,
            Source::Dns {
                host: "vllm.svc.cluster.local".into(),
                port: 8000
            }
        );
        assert_eq!(
            eps[1].labels,
            vec![
                ("cluster".into(), "c1".into()),
                ("region".into(), "us".into()),
                ("zone".into(), "a".into())
            ],
            "endpoint labels override the pool's, sorted by key"
        );
        assert_eq!(c.dns_sources(), vec!["vllm.svc.cluster.local".to_string()]);
        assert!(c.dns_servers.is_empty(), "the system resolver by default");
        assert_eq!(c.endpoints_file_poll_interval, Duration::from_secs(1));

        let json = r#"{"pools": [{"name": "p", "endpoints": [{"address": "127.0.0.1:1", "server_type": "triton-trtllm"}]}]}"#;
        let c = CollectorConfig::parse(json, true, no_env).unwrap();
        assert_eq!(
            c.pools[0].endpoints[0].server_type,
            ServerType::TritonTrtllm
        );
        // YAML reads JSON too.
        assert!(parse_yaml(json).is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("pools: []", "pools"),
            (
                "pools: [{name: a, endpoints: ['127.0.0.1:1']}, {name: b, endpoints: ['nope']}]",
                "pools[1].endpoints[0]",
            ),
            (
                "pools: [{name: a, endpoints: ['127.0.0.1:1']}, {name: b, endpoints: ['10.0.0.300:80']}]",
                "pools[1].endpoints[0]",
            ),
            ("pools: [{name: a, endpoints: ['127.0.0.1:0']}]", "pools[0].endpoints[0]"),
            ("pools: [{name: a, endpoints: ['host:99999']}]", "pools[0].endpoints[0]"),
            ("pools: [{name: a, endpoints: []}]", "pools[0].endpoints"),
            ("pools: [{name: '', endpoints: ['127.0.0.1:1']}]", "pools[0].name"),
            (
                "pools: [{name: a, endpoints: ['127.0.0.1:1']}, {name: a, endpoints: ['127.0.0.1:2']}]",
                "pools[1].name",
            ),
            (
                "pools: [{name: a, endpoints: ['127.0.0.1:1', '127.0.0.1:1']}]",
                "pools[0].endpoints[1]",
            ),
            (
                "pools: [{name: a, endpoints: [{address: '127.0.0.1:1', server_type: vlm}]}]",
                "pools[0].endpoints[0].server_type",
            ),
            (
                "pools: [{name: a, endpoints: [{address: '127.0.0.1:1', colour: red}]}]",
                "pools[0].endpoints[0].colour",
            ),
            (
                "pools: [{name: a, endpoints: [{address: '127.0.0.1:1', labels: {'bad key': x}}]}]",
                "pools[0].endpoints[0].labels.bad key",
            ),
            (
                "pools: [{name: a, server_type: tgi, endpoints: ['127.0.0.1:1']}, {name: b, endpoints: ['127.0.0.1:1']}]",
                "pools[1].endpoints[0].server_type",
            ),
            ("pools: [{name: a, endpoints: [42]}]", "pools[0].endpoints[0]"),
            ("scrape_interval_ms: 0\npools: []", "scrape_interval_ms"),
            ("scrape_interval_ms: -5\npools: []", "scrape_interval_ms"),
            ("dns_refresh_interval_ms: 5\npools: []", "dns_refresh_interval_ms"),
            ("push_backoff_initial_ms: 500\npush_backoff_max_ms: 100\npools: []", "push_backoff_max_ms"),
            ("listen: nowhere\npools: []", "listen"),
            ("scrape_intervall_ms: 5\npools: []", "scrape_intervall_ms"),
            ("push_targets: ['127.0.0.1:9902']\npools: []", "token"),
            ("push_targets: ['https://x:1']\ntoken: '0123456789'\npools: []", "push_targets[0]"),
            ("push_targets: ['a b']\ntoken: '0123456789'\npools: []", "push_targets[0]"),
            ("push_targets: ['x:1', 'x:1']\ntoken: '0123456789'\npools: []", "push_targets[1]"),
            ("token: short\npools: []", "token"),
            ("token: \"0123 456789\"\npools: []", "token"),
            ("token: \"0123456789\\u00e9\"\npools: []", "token"),
            ("token: a\ntoken_env: B\npools: []", "token_env"),
            ("token_env: IGW_SURELY_UNSET\npools: []", "token_env"),
            ("pools: [{name: a}]", "pools[0].endpoints"),
            ("pools: [{name: a, endpoints_file: ''}]", "pools[0].endpoints_file"),
            ("pools: [{name: a, endpoints: ['10.0.0.7']}]", "pools[0].endpoints[0]"),
            (
                "pools: [{name: a, target_ports: [8000, 0], endpoints: ['10.0.0.7']}]",
                "pools[0].target_ports[1]",
            ),
            (
                "pools: [{name: a, target_ports: [8000, 8000], endpoints: ['10.0.0.7']}]",
                "pools[0].target_ports[1]",
            ),
            (
                "pools: [{name: a, target_ports: [8000, 70000], endpoints: ['10.0.0.7']}]",
                "pools[0].target_ports[1]",
            ),
            (
                "pools: [{name: a, target_ports: [8000], endpoints: ['10.0.0.7', '10.0.0.7:8000']}]",
                "pools[0].endpoints[1]",
            ),
            ("dns_servers: ['10.0.0.10']\npools: []", "dns_servers[0]"),
            ("dns_servers: ['127.0.0.1:53', '127.0.0.1:0']\npools: []", "dns_servers[1]"),
            ("dns_servers: ['127.0.0.1:53', '127.0.0.1:53']\npools: []", "dns_servers[1]"),
            ("endpoints_file_poll_interval_ms: 10\npools: []", "endpoints_file_poll_interval_ms"),
            ("push_targets: [{file: ''}]\ntoken: '0123456789'\npools: []", "push_targets[0].file"),
            ("push_targets: [{path: x}]\ntoken: '0123456789'\npools: []", "push_targets[0].path"),
            ("push_targets: [{file: /a}, {file: /a}]\ntoken: '0123456789'\npools: []", "push_targets[1]"),
            ("push_targets: ['gw.svc']\ntoken: '0123456789'\npools: []", "push_targets[0]"),
            ("push_targets: ['http://gw.svc:1/a b']\ntoken: '0123456789'\npools: []", "push_targets[0]"),
            ("push_targets: [{file: /a}]\npools: []", "token"),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(text, field)| {
                let got = field_of(text);
                (got != *field).then(|| format!("{text}: got '{got}', want '{field}'"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        let e = parse_yaml(
            "pools: [{name: a, endpoints: ['127.0.0.1:1']}, {name: b, endpoints: ['nope']}]",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: pools[1].endpoints[0]: 'nope' has no port: write host:port, or set pools[1].target_ports"
        );
        let e = parse_yaml("pools: [{name: a, endpoints: ['a b']}]").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: pools[0].endpoints[0]: not ip:port, host:port, ip or host: 'a b'"
        );
        let e = parse_yaml("scrape_intervall_ms: 5\npools: []").unwrap_err();
        assert!(e.message.contains("scrape_intervall_ms"), "{e}");
        assert!(CollectorConfig::parse("{\"pools\": [", true, no_env).is_err());
        assert!(parse_yaml("pools: [").is_err());
    }

    #[test]
    fn token_from_the_environment() {
        let env = |k: &str| (k == "IGW_TOKEN").then(|| "from-env-123".to_string());
        let c = CollectorConfig::parse(
            "push_targets: ['127.0.0.1:9902']\ntoken_env: IGW_TOKEN\npools: [{name: a, endpoints: ['127.0.0.1:1']}]",
            false,
            env,
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("from-env-123"));
    }

    #[test]
    fn target_ports_expand_port_less_endpoints() {
        let c = parse_yaml(
            "pools:\n- name: p\n  target_ports: [8000, 8001]\n  endpoints: ['10.0.0.7', 'vllm-headless.default.svc', '[fd00::1]', 'fd00::2', '10.0.0.8:9000', {address: 'vllm.x', server_type: sglang}]",
        )
        .unwrap();
        let got: Vec<String> = c.pools[0]
            .endpoints
            .iter()
            .map(|e| format!("{} {}", e.source, e.server_type))
            .collect();
        assert_eq!(
            got,
            [
                "10.0.0.7:8000 vllm",
                "10.0.0.7:8001 vllm",
                "vllm-headless.default.svc:8000 vllm",
                "vllm-headless.default.svc:8001 vllm",
                "[fd00::1]:8000 vllm",
                "[fd00::1]:8001 vllm",
                "[fd00::2]:8000 vllm",
                "[fd00::2]:8001 vllm",
                "10.0.0.8:9000 vllm",
                "vllm.x:8000 sglang",
                "vllm.x:8001 sglang",
            ]
        );
        assert_eq!(c.pools[0].target_ports, [8000, 8001]);
        assert_eq!(
            c.dns_sources(),
            [
                "vllm-headless.default.svc".to_string(),
                "vllm.x".to_string()
            ]
        );
    }

    #[test]
    fn discovery_fields() {
        let c = parse_yaml(
            r#"
dns_servers: ["127.0.0.1:5353", "[::1]:53"]
endpoints_file_poll_interval_ms: 200
token: "0123456789"
push_targets:
  - "envoy-gw.ns.svc:10001"
  - "http://envoy-gw.other.svc:10002/v1/snapshot"
  - {file: /etc/igw/push-targets.yaml}
pools:
  - name: file-only
    endpoints_file: /etc/igw/endpoints.yaml
    target_ports: [8000]
  - name: both
    endpoints: ["127.0.0.1:1"]
    endpoints_file: eps.json
"#,
        )
        .unwrap();
        assert_eq!(
            c.dns_servers,
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(c.endpoints_file_poll_interval, Duration::from_millis(200));
        assert_eq!(
            c.pools[0].endpoints_file.as_deref(),
            Some(std::path::Path::new("/etc/igw/endpoints.yaml"))
        );
        assert!(c.pools[0].endpoints.is_empty());
        assert_eq!(c.pools[1].endpoints.len(), 1);
        assert_eq!(
            c.push_targets[2],
            PushTargetSpec::File("/etc/igw/push-targets.yaml".into())
        );
        match &c.push_targets[0] {
            PushTargetSpec::Entry(e) => {
                assert_eq!(e.host, Host::Name("envoy-gw.ns.svc".into()));
                assert_eq!(e.port, 10001);
                assert_eq!(e.path, "/v1/snapshot");
                assert_eq!(e.name, "envoy-gw.ns.svc:10001");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.dns_sources(),
            [
                "envoy-gw.ns.svc".to_string(),
                "envoy-gw.other.svc".to_string()
            ],
            "push target names are resolved too"
        );
        assert!(c.has_dynamic_sources());
        assert!(!parse_yaml(MINIMAL).unwrap().has_dynamic_sources());
    }

    #[test]
    fn addresses() {
        let a = |s: &str| parse_address(s).map(|a| (a.host.to_string(), a.port));
        assert_eq!(a("10.0.0.7"), Ok(("10.0.0.7".into(), None)));
        assert_eq!(a("10.0.0.7:80"), Ok(("10.0.0.7".into(), Some(80))));
        assert_eq!(a("[fd00::1]"), Ok(("[fd00::1]".into(), None)));
        assert_eq!(a("fd00::1"), Ok(("[fd00::1]".into(), None)));
        assert_eq!(a("[fd00::1]:80"), Ok(("[fd00::1]".into(), Some(80))));
        assert_eq!(a("Svc.NS:80"), Ok(("svc.ns".into(), Some(80))));
        assert_eq!(a("svc.ns."), Ok(("svc.ns.".into(), None)));
        for bad in [
            "",
            ":80",
            "host:",
            "-a:80",
            "a_b:80",
            "1.2.3:80",
            "1.2.3",
            "a..b",
            "[fd00::1",
            "[x]",
            "10.0.0.1:0",
            "h:0",
            "a b",
            "h:99999",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            parse_source("[::1]:8000"),
            Ok(Source::Static("[::1]:8000".parse().unwrap()))
        );
        assert_eq!(
            parse_source("Model-0.Svc:80"),
            Ok(Source::Dns {
                host: "model-0.svc".into(),
                port: 80
            })
        );
        for bad in [
            "", ":80", "host", "host:", "-a:80", "a_b:80", "1.2.3:80", "::1:80", "a..b:1",
        ] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }
}
