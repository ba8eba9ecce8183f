//! Shared data through the host, behind the pure `SharedStore` trait.

use crate::inflight::{self, SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// Key holding the JSON list of endpoints whose counters exist, for `/debug/state`.
pub const ENDPOINTS_KEY: &str = "igw.endpoints";

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}

/// Creates the in-flight counters of `endpoints` and adds them to the index.
pub fn register_endpoints(endpoints: &[String]) {
    for e in endpoints {
        if let Err(err) = inflight::ensure(&HostStore, e) {
            log::warn!("inference-gateway: cannot create in-flight counter for {e}: {err:?}");
        }
    }
    for _ in 0..16 {
        let (bytes, cas) = HostStore.get(ENDPOINTS_KEY);
        let mut known = registered_endpoints_from(bytes.as_deref());
        let before = known.len();
        for e in endpoints {
            if !known.contains(e) {
                known.push(e.clone());
            }
        }
        if known.len() == before && bytes.is_some() {
            return;
        }
        let json = serde_json::to_vec(&known).unwrap_or_default();
        match HostStore.set(ENDPOINTS_KEY, &json, cas) {
            Err(StoreError::CasMismatch) => continue,
            Err(err) => {
                log::warn!("inference-gateway: cannot record endpoint index: {err:?}");
                return;
            }
            Ok(()) => return,
        }
    }
}

pub fn registered_endpoints() -> Vec<String> {
    registered_endpoints_from(HostStore.get(ENDPOINTS_KEY).0.as_deref())
}

fn registered_endpoints_from(bytes: Option<&[u8]>) -> Vec<String> {
    bytes
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}
