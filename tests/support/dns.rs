//! A real DNS server on loopback for discovery tests: hickory-server with an
//! in-memory zone whose records a test changes while it runs. Every record has
//! TTL 0 (and the SOA's negative TTL is 0), so a resolver that honours TTLs sees a
//! change on its next lookup.
//!
//! ```ignore
//! let dns = support::dns::DnsServer::start("test.local").await;
//! dns.set_a("vllm.test.local", vec![Ipv4Addr::new(127, 0, 0, 1)]).await;
//! // collector config: dns_servers: ["{dns.addr()}"]
//! ```
//! Names outside the zone are refused; a name of the zone without records is
//! NXDOMAIN, a name with only A records answers AAAA with no records (NODATA).

use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub struct DnsServer {
    addr: SocketAddr,
    origin: Name,
    zone: Arc<InMemoryZoneHandler>,
    /// Dropping the server stops its tasks.
    _server: Server<Catalog>,
}

fn name(s: &str) -> Name {
    let fqdn = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(&fqdn).unwrap_or_else(|e| panic!("DNS name '{s}': {e}"))
}

impl DnsServer {
    /// Serves zone `origin` (e.g. `"test.local"`) on UDP and TCP at
    /// 127.0.0.1:<free port>. Must run inside a Tokio runtime.
    pub async fn start(origin: &str) -> DnsServer {
        let origin = name(origin);
        let zone = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name(&format!("ns.{origin}")),
            name(&format!("hostmaster.{origin}")),
            1,
            60,
            60,
            600,
            0,
        );
        assert!(
            zone.upsert(Record::from_rdata(origin.clone(), 0, RData::SOA(soa)), 1)
                .await,
            "SOA"
        );
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let mut server = Server::new(catalog);
        // UDP and TCP on the same port (TCP only matters for truncated answers).
        let mut last = String::new();
        for _ in 0..20 {
            let udp = match tokio::net::UdpSocket::bind("127.0.0.1:0").await {
                Ok(s) => s,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let addr = udp.local_addr().expect("UDP local address");
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => {
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(5), 64);
                    return DnsServer {
                        addr,
                        origin,
                        zone,
                        _server: server,
                    };
                }
                Err(e) => last = e.to_string(),
            }
        }
        panic!("no free UDP+TCP port for the test DNS server: {last}");
    }

    /// `ip:port` to put in `dns_servers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The zone's origin, e.g. `test.local.`.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// Replaces the A records of `host` (a name in the zone); an empty list
    /// removes them.
    pub async fn set_a(&self, host: &str, ips: Vec<Ipv4Addr>) {
        self.replace(
            host,
            RecordType::A,
            ips.into_iter().map(|ip| RData::A(A(ip))),
        )
        .await;
    }

    /// Replaces the AAAA records of `host`; an empty list removes them.
    pub async fn set_aaaa(&self, host: &str, ips: Vec<Ipv6Addr>) {
        self.replace(
            host,
            RecordType::AAAA,
            ips.into_iter().map(|ip| RData::AAAA(AAAA(ip))),
        )
        .await;
    }

    async fn replace(&self, host: &str, rtype: RecordType, data: impl Iterator<Item = RData>) {
        let n = name(host);
        assert!(
            self.origin.zone_of(&n),
            "{host} is not in the zone {}",
            self.origin
        );
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::new(&n), rtype));
        for d in data {
            assert!(
                self.zone
                    .upsert(Record::from_rdata(n.clone(), 0, d), 1)
                    .await,
                "upsert {host}"
            );
        }
    }
}
