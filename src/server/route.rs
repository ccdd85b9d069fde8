//! An upstream server as a snapshot of the settings has it: its config
//! entry and the TLS settings built from it.

use std::sync::Arc;

use crate::config::UpstreamConfig;
use crate::tls::UpstreamTls;

/// An upstream server with the TLS settings built from its entry.
pub struct Route {
    pub config: UpstreamConfig,
    pub tls: Option<Arc<UpstreamTls>>,
}

impl Route {
    /// Whether a connection logged in as `user` under `self` is one that
    /// `other` would make too: the same addresses, TLS settings and
    /// credential. A reload that changes any of them retires the pooled
    /// connections made under the old ones; a reload that changes nothing
    /// about this upstream (new tokens, a new log level) keeps them.
    pub fn same_login(&self, other: &Route, user: &str) -> bool {
        if std::ptr::eq(self, other) {
            // No reload since the login: asked at every lend.
            return true;
        }
        let (a, b) = (&self.config, &other.config);
        fn password<'a>(c: &'a UpstreamConfig, user: &str) -> Option<Option<&'a [u8]>> {
            c.credentials
                .get(user)
                .map(|p| p.as_ref().map(|s| s.expose()))
        }
        a.host == b.host
            && a.port == b.port
            && a.addrs == b.addrs
            && a.socket == b.socket
            && a.tls == b.tls
            && a.ca_file == b.ca_file
            && a.client_cert == b.client_cert
            && a.require_auth == b.require_auth
            && password(a, user) == password(b, user)
    }
}
