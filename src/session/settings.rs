//! What a reload can change, published to the shards as one snapshot (see
//! [`ShardContext::settings`](super::ShardContext::settings)): the
//! validated config and, per upstream, the TLS settings built from it.
//! Keeping the upstream TLS config beside the config it was built from
//! means a session never pairs one with the other's predecessor.

use std::sync::Arc;

use crate::config::Config;
use crate::tls::UpstreamTls;

/// What a reload can change, as one snapshot.
pub struct Settings {
    pub config: Config,
    /// One per `config.upstreams` entry, in the same order.
    pub routes: Vec<Arc<Route>>,
}

pub use crate::server::Route;

impl Settings {
    /// Builds each upstream's TLS settings; fails on a bad certificate or
    /// CA file.
    pub fn new(config: Config) -> Result<Settings, crate::tls::TlsConfigError> {
        let routes = config
            .upstreams
            .iter()
            .map(|up| {
                let tls = UpstreamTls::new(
                    up.tls,
                    up.ca_file.as_deref(),
                    up.client_cert
                        .as_ref()
                        .map(|(c, k)| (c.as_path(), k.as_path())),
                )?
                .map(Arc::new);
                Ok(Arc::new(Route {
                    config: up.clone(),
                    tls,
                }))
            })
            .collect::<Result<_, crate::tls::TlsConfigError>>()?;
        Ok(Settings { config, routes })
    }
}
