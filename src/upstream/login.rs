//! Logging in to the real PostgreSQL server on the client's behalf, as a
//! sans-IO state machine.
//!
//! tollgate sends the client's start-up parameters with the role the token
//! was issued for, answers the server's authentication request with its own
//! credentials (SCRAM-SHA-256, md5, cleartext, or none for trust), and
//! collects everything from AuthenticationOk to the first ReadyForQuery
//! verbatim, for the session to hand to the client in one write.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>
#![forbid(unsafe_code)]

use std::fmt;

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use super::scram::{
    self, AwaitServerFinal, AwaitServerFirst, ChannelBinding, KeyCache, ScramClient,
};
use crate::config::AuthMethods;
use crate::protocol::backend::{
    self, parse_login_message, BackendKey, BeLoginMessage, ErrorFields,
};
use crate::protocol::startup::{encode_startup_message, ProtocolVersion};
use crate::secret::Secret;

/// Why the upstream login failed. The session logs the details and maps
/// each to what the client may see.
#[derive(Debug)]
pub enum LoginError {
    /// The server refused tollgate's credentials (SQLSTATE class 28) or
    /// asked for a password tollgate does not have.
    Rejected {
        detail: String,
    },
    /// Any other server error (unknown database, too many connections...):
    /// the client would have seen it connecting directly, so it is relayed
    /// verbatim; `response` is the whole ErrorResponse message.
    ServerError {
        code: String,
        response: Vec<u8>,
    },
    /// An authentication method tollgate does not speak.
    Unsupported {
        detail: String,
    },
    Scram(scram::ScramError),
    /// A message that is malformed or out of place.
    Protocol {
        detail: String,
    },
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginError::Rejected { detail } => write!(f, "upstream refused the login: {detail}"),
            LoginError::ServerError { code, .. } => write!(f, "upstream error {code}"),
            LoginError::Unsupported { detail } => {
                write!(f, "unsupported upstream authentication: {detail}")
            }
            LoginError::Scram(e) => write!(f, "upstream SCRAM exchange failed: {e}"),
            LoginError::Protocol { detail } => write!(f, "upstream protocol error: {detail}"),
        }
    }
}

impl std::error::Error for LoginError {}

/// Refuses an authentication request that `require_auth` does not allow,
/// before any password (or hash of one) is sent.
fn check_allowed(allowed: bool, asked: &str) -> Result<(), LoginError> {
    if allowed {
        return Ok(());
    }
    Err(LoginError::Unsupported {
        detail: format!("the server asked for {asked}, which require_auth does not allow"),
    })
}

/// Where the login stands; each state is named for what it waits for.
#[allow(clippy::enum_variant_names)]
enum Phase {
    AwaitAuthRequest,
    AwaitScramServerFirst(AwaitServerFirst),
    AwaitScramServerFinal(AwaitServerFinal),
    /// Credentials sent; the next authentication message must be Ok.
    AwaitAuthOk,
    /// Authenticated: relaying ParameterStatus etc. up to ReadyForQuery.
    AwaitReady,
}

/// An upstream login in progress.
pub struct Login {
    phase: Phase,
    user: String,
    password: Option<Secret>,
    /// What the transport allows: `TlsServerEndPoint` on TLS, so the
    /// server's SCRAM-SHA-256-PLUS is used when offered.
    channel_binding: ChannelBinding,
    /// How the server authenticated us, for the session log.
    auth_method: &'static str,
    /// The minor protocol version the client asked for, the one asked of
    /// the server (never newer than tollgate understands), and the one in
    /// force (lowered by the server's NegotiateProtocolVersion).
    client_minor: u16,
    asked_minor: u16,
    minor: u16,
    negotiated: bool,
    /// The cancel secret tollgate hands the client instead of the
    /// server's, beside the server's own process id.
    issued: [u8; ISSUED_KEY_LEN],
    /// The server's own key, kept for forwarding cancels.
    upstream_key: Option<BackendKey>,
    /// Finishes the issued secret once the server's process id is known
    /// (a fleet's tag covers it).
    seal: Option<SealKey>,
    /// Which authentication requests are answered.
    allowed: AuthMethods,
}

/// Length of the cancel secret tollgate issues under protocol 3.2 (what
/// PostgreSQL 18 issues); 3.0 keys are 4 bytes, the first 4 of these.
pub const ISSUED_KEY_LEN: usize = 32;

/// Most bytes collected for the client between AuthenticationOk and
/// ReadyForQuery. They are held in memory until ReadyForQuery arrives, so a
/// server that streamed ParameterStatus or NoticeResponse messages without
/// end would otherwise grow one session's buffer until the connect timeout
/// (gigabytes on a fast link). PostgreSQL sends about 1 KiB here (a dozen
/// ParameterStatus messages and the key); the bound leaves room for notices
/// from login event triggers.
pub const MAX_LOGIN_RELAY_LEN: usize = 1024 * 1024;

/// Finishes an issued cancel secret for the backend's process id.
pub type SealKey = Box<dyn Fn(u32, &mut [u8; ISSUED_KEY_LEN])>;

/// A logged-in upstream session, as the login leaves it.
#[derive(Debug)]
pub struct Ready {
    /// How tollgate authenticated (`trust`, `password`, `md5`, or the SASL
    /// mechanism, e.g. `SCRAM-SHA-256-PLUS` when channel binding was used).
    pub auth_method: &'static str,
    /// The server's BackendKeyData, if it sent one.
    pub upstream_key: Option<BackendKey>,
    /// The key the client was given (empty secret when the server sent
    /// none, so neither did tollgate).
    pub issued_key: Option<BackendKey>,
    /// The protocol version in force (3.x).
    pub minor: u16,
}

/// What one server message did.
pub enum LoginStep {
    Continue(Login),
    /// ReadyForQuery arrived: the session is open.
    Ready(Ready),
}

impl Login {
    /// Starts a login as `user`, appending the StartupMessage to `to_server`.
    /// `params` are the client's (without `user`, which tollgate sets),
    /// protocol options (`_pq_.*`) included: the server answers them.
    /// `issued` is the cancel secret the client gets in place of the
    /// server's; the process id it gets is the server's own.
    pub fn start<'a>(
        user: &'a str,
        password: Option<Secret>,
        channel_binding: ChannelBinding,
        version: ProtocolVersion,
        params: impl Iterator<Item = (&'a str, &'a str)>,
        issued: [u8; ISSUED_KEY_LEN],
        to_server: &mut BytesMut,
    ) -> Login {
        let asked = ProtocolVersion {
            major: 3,
            minor: version.minor.min(ProtocolVersion::NEWEST.minor),
        };
        let params = std::iter::once(("user", user)).chain(params.filter(|(k, _)| *k != "user"));
        encode_startup_message(to_server, asked, params);
        Login {
            phase: Phase::AwaitAuthRequest,
            user: user.to_owned(),
            password,
            channel_binding,
            auth_method: "trust",
            client_minor: version.minor,
            asked_minor: asked.minor,
            minor: asked.minor,
            negotiated: false,
            issued,
            upstream_key: None,
            seal: None,
            allowed: AuthMethods::ANY,
        }
    }

    /// Answers only the authentication methods in `allowed`.
    pub fn require(mut self, allowed: AuthMethods) -> Login {
        self.allowed = allowed;
        self
    }

    /// Finishes the issued secret with `seal` when the server's process id
    /// arrives, before the client's BackendKeyData is written.
    pub fn seal_with(mut self, seal: SealKey) -> Login {
        self.seal = Some(seal);
        self
    }

    fn password(&self, method: &str) -> Result<&[u8], LoginError> {
        self.password
            .as_ref()
            .map(Secret::expose)
            .ok_or_else(|| LoginError::Rejected {
                detail: format!(
                    "the server asked for a {method} password for role \"{}\" and none is configured",
                    self.user
                ),
            })
    }

    /// Handles one complete server message. Replies go to `to_server`;
    /// messages for the client (from AuthenticationOk on) to `to_client`.
    pub fn on_message(
        mut self,
        msg: &[u8],
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
        cache: &mut KeyCache,
    ) -> Result<LoginStep, LoginError> {
        let parsed = parse_login_message(msg).map_err(|e| LoginError::Protocol {
            detail: e.to_string(),
        })?;
        if to_client.len() + msg.len() > MAX_LOGIN_RELAY_LEN {
            return Err(LoginError::Protocol {
                detail: format!(
                    "more than {MAX_LOGIN_RELAY_LEN} bytes of messages before ReadyForQuery"
                ),
            });
        }
        let authenticated = matches!(self.phase, Phase::AwaitReady);
        match parsed {
            BeLoginMessage::ErrorResponse(fields) => {
                return Err(server_error(fields, msg, authenticated))
            }
            // Notices may come at any time; before authentication they are
            // the server's business with tollgate, after it the client's.
            BeLoginMessage::NoticeResponse => {
                if authenticated {
                    to_client.extend_from_slice(msg);
                }
                return Ok(LoginStep::Continue(self));
            }
            _ => {}
        }
        let phase = std::mem::replace(&mut self.phase, Phase::AwaitAuthRequest);
        self.phase = match (phase, parsed) {
            (Phase::AwaitReady, BeLoginMessage::ReadyForQuery { .. }) => {
                to_client.extend_from_slice(msg);
                return Ok(LoginStep::Ready(self.ready()));
            }
            (Phase::AwaitReady, BeLoginMessage::ParameterStatus) => {
                to_client.extend_from_slice(msg);
                Phase::AwaitReady
            }
            (
                Phase::AwaitReady,
                BeLoginMessage::BackendKeyData {
                    process_id,
                    secret_key,
                },
            ) => self.on_backend_key_data(process_id, secret_key, to_client)?,
            (
                Phase::AwaitAuthRequest,
                BeLoginMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                },
            ) if !self.negotiated => {
                self.on_negotiate_protocol_version(newest_minor, unrecognized, msg, to_client)?
            }
            (Phase::AwaitAuthRequest, BeLoginMessage::AuthenticationOk) if !self.allowed.none => {
                return Err(LoginError::Unsupported {
                    detail:
                        "the server asked for no authentication, which require_auth does not allow"
                            .into(),
                });
            }
            (Phase::AwaitAuthRequest | Phase::AwaitAuthOk, BeLoginMessage::AuthenticationOk) => {
                self.on_authentication_ok(msg, to_client)
            }
            (Phase::AwaitAuthRequest, BeLoginMessage::AuthenticationCleartextPassword) => {
                self.send_password(None, to_server)?
            }
            (Phase::AwaitAuthRequest, BeLoginMessage::AuthenticationMd5Password { salt }) => {
                self.send_password(Some(salt), to_server)?
            }
            (Phase::AwaitAuthRequest, BeLoginMessage::AuthenticationSasl { mechanisms }) => {
                self.on_authentication_sasl(&mechanisms, to_server)?
            }
            (
                Phase::AwaitScramServerFirst(state),
                BeLoginMessage::AuthenticationSaslContinue { data },
            ) => {
                let (client_final, state) = state
                    .handle_server_first(data, cache)
                    .map_err(LoginError::Scram)?;
                frontend::sasl_response(&client_final, to_server).map_err(protocol)?;
                Phase::AwaitScramServerFinal(state)
            }
            (
                Phase::AwaitScramServerFinal(state),
                BeLoginMessage::AuthenticationSaslFinal { data },
            ) => {
                // Verifies the server signature: a server that does not know
                // the password cannot get past this.
                state.handle_server_final(data).map_err(LoginError::Scram)?;
                Phase::AwaitAuthOk
            }
            (Phase::AwaitAuthRequest, BeLoginMessage::AuthenticationOther { code }) => {
                return Err(LoginError::Unsupported {
                    detail: format!("authentication request code {code}"),
                })
            }
            (_, other) => {
                return Err(LoginError::Protocol {
                    detail: format!("unexpected message {}", describe(&other)),
                })
            }
        };
        Ok(LoginStep::Continue(self))
    }
}

impl Login {
    /// The server's BackendKeyData: kept, and replaced for the client by
    /// its backend's process id with tollgate's secret, never the
    /// server's: a cancel must come back through tollgate, which knows
    /// which server and session it belongs to.
    fn on_backend_key_data(
        &mut self,
        process_id: u32,
        secret_key: &[u8],
        to_client: &mut BytesMut,
    ) -> Result<Phase, LoginError> {
        if self.upstream_key.is_some()
            || (self.minor < ProtocolVersion::LONG_CANCEL_KEYS && secret_key.len() != 4)
        {
            return Err(LoginError::Protocol {
                detail: "duplicate or malformed BackendKeyData".into(),
            });
        }
        let upstream = BackendKey {
            process_id,
            secret_key: secret_key.into(),
        };
        if let Some(seal) = &self.seal {
            seal(process_id, &mut self.issued);
        }
        let key = self.issued_key(&upstream);
        backend::backend_key_data(to_client, key.process_id, &key.secret_key);
        self.upstream_key = Some(upstream);
        Ok(Phase::AwaitReady)
    }

    /// The server's answer to the client's version and options, relayed
    /// as is. It must have a reason: a lower version, or options it did
    /// not recognize.
    fn on_negotiate_protocol_version(
        &mut self,
        newest_minor: u16,
        unrecognized: u32,
        msg: &[u8],
        to_client: &mut BytesMut,
    ) -> Result<Phase, LoginError> {
        if newest_minor > self.asked_minor
            || (newest_minor == self.asked_minor && unrecognized == 0)
        {
            return Err(LoginError::Protocol {
                detail: format!(
                    "NegotiateProtocolVersion offers 3.{newest_minor} after 3.{} was asked",
                    self.asked_minor
                ),
            });
        }
        self.negotiated = true;
        self.minor = newest_minor.min(self.asked_minor);
        to_client.extend_from_slice(msg);
        Ok(Phase::AwaitAuthRequest)
    }

    /// Authenticated: AuthenticationOk goes to the client (which is waiting
    /// for it after sending its token), after a NegotiateProtocolVersion
    /// when the client asked for more than tollgate understands and the
    /// server took what tollgate asked, as a server that stops at 3.2
    /// would say what is in force.
    fn on_authentication_ok(&mut self, msg: &[u8], to_client: &mut BytesMut) -> Phase {
        if !self.negotiated && self.client_minor > self.asked_minor {
            backend::negotiate_protocol_version(to_client, self.minor as u32, [].into_iter());
        }
        to_client.extend_from_slice(msg);
        Phase::AwaitReady
    }

    /// A password request: the password in the clear, or (with a salt) its
    /// md5 hash, if `require_auth` allows the method.
    fn send_password(
        &mut self,
        md5_salt: Option<[u8; 4]>,
        to_server: &mut BytesMut,
    ) -> Result<Phase, LoginError> {
        match md5_salt {
            None => {
                check_allowed(self.allowed.password, "a cleartext password")?;
                let password = self.password("cleartext")?;
                frontend::password_message(password, to_server).map_err(protocol)?;
                self.auth_method = "password";
            }
            Some(salt) => {
                check_allowed(self.allowed.md5, "an md5 password")?;
                let password = self.password("md5")?;
                let hashed = super::md5::md5_password_message_payload(&self.user, password, salt);
                frontend::password_message(hashed.as_bytes(), to_server).map_err(protocol)?;
                self.auth_method = "md5";
            }
        }
        Ok(Phase::AwaitAuthOk)
    }

    /// A SASL request: SCRAM-SHA-256-PLUS when the server offers it on TLS
    /// (a man in the middle between tollgate and Postgres cannot relay the
    /// login), SCRAM-SHA-256 otherwise.
    fn on_authentication_sasl(
        &mut self,
        mechanisms: &[&str],
        to_server: &mut BytesMut,
    ) -> Result<Phase, LoginError> {
        check_allowed(self.allowed.scram, "SASL (SCRAM)")?;
        let binding = match &self.channel_binding {
            ChannelBinding::TlsServerEndPoint(_) if mechanisms.contains(&scram::MECHANISM_PLUS) => {
                self.channel_binding.clone()
            }
            // We could bind but the server did not offer it ("y").
            ChannelBinding::TlsServerEndPoint(_) => ChannelBinding::SupportedButNotUsed,
            other => other.clone(),
        };
        if !mechanisms.contains(&binding.mechanism()) {
            return Err(LoginError::Unsupported {
                detail: format!("SASL mechanisms {mechanisms:?}"),
            });
        }
        let password = self.password("SCRAM")?;
        let (first, state) =
            ScramClient::start(password, binding, None).map_err(LoginError::Scram)?;
        self.auth_method = first.mechanism;
        frontend::sasl_initial_response(first.mechanism, &first.message, to_server)
            .map_err(protocol)?;
        Ok(Phase::AwaitScramServerFirst(state))
    }

    /// ReadyForQuery: the login is over.
    fn ready(self) -> Ready {
        let issued_key = self.upstream_key.as_ref().map(|k| self.issued_key(k));
        Ready {
            auth_method: self.auth_method,
            upstream_key: self.upstream_key,
            issued_key,
            minor: self.minor,
        }
    }

    /// The key the client gets once the server's is known: the server's
    /// process id, and 4 bytes of the issued secret under 3.0, all of it
    /// from 3.2 on.
    fn issued_key(&self, upstream: &BackendKey) -> BackendKey {
        let len = if self.minor >= ProtocolVersion::LONG_CANCEL_KEYS {
            ISSUED_KEY_LEN
        } else {
            4
        };
        BackendKey {
            process_id: upstream.process_id,
            secret_key: self.issued[..len].into(),
        }
    }
}

fn protocol(e: std::io::Error) -> LoginError {
    LoginError::Protocol {
        detail: e.to_string(),
    }
}

fn server_error(fields: ErrorFields<'_>, msg: &[u8], authenticated: bool) -> LoginError {
    // Class 28 before authentication completes means tollgate's own
    // credentials were refused: a configuration problem to log, not a
    // message for the client (who presented a valid token).
    if !authenticated && fields.code.starts_with("28") {
        return LoginError::Rejected {
            detail: format!("{} {}", fields.code, fields.message),
        };
    }
    LoginError::ServerError {
        code: fields.code.to_owned(),
        response: msg.to_vec(),
    }
}

fn describe(m: &BeLoginMessage<'_>) -> String {
    match m {
        BeLoginMessage::Unexpected { tag } => format!("type 0x{tag:02x}"),
        other => {
            let s = format!("{other:?}");
            // The variant name only: payloads stay out of logs.
            s.split(['{', '(', ' '])
                .next()
                .unwrap_or_default()
                .to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend;
    use crate::protocol::frame::peek_frame;

    const ISSUED: [u8; ISSUED_KEY_LEN] = [0xab; ISSUED_KEY_LEN];

    fn start(password: Option<&str>) -> (Login, BytesMut) {
        start_version(password, 0)
    }

    fn start_version(password: Option<&str>, minor: u16) -> (Login, BytesMut) {
        let mut to_server = BytesMut::new();
        let login = Login::start(
            "app",
            password.map(|p| Secret::new(p.as_bytes().to_vec())),
            ChannelBinding::NotSupported,
            ProtocolVersion { major: 3, minor },
            [
                ("user", "ignored"),
                ("database", "appdb"),
                ("application_name", "x"),
            ]
            .into_iter(),
            ISSUED,
            &mut to_server,
        );
        (login, to_server)
    }

    /// Feeds `server` to a login until Ready; returns what the client got.
    fn try_run(login: Login, server: &[u8]) -> Result<(BytesMut, Ready), LoginError> {
        let mut cache = KeyCache::new();
        let (mut ts, mut tc) = (BytesMut::new(), BytesMut::new());
        let mut login = Some(login);
        let mut rest = server;
        while let Some(f) = peek_frame(rest, 1 << 16).unwrap() {
            let step = login.take().unwrap().on_message(
                &rest[..f.total_len],
                &mut ts,
                &mut tc,
                &mut cache,
            )?;
            rest = &rest[f.total_len..];
            match step {
                LoginStep::Continue(l) => login = Some(l),
                LoginStep::Ready(r) => return Ok((tc, r)),
            }
        }
        panic!("no ReadyForQuery")
    }

    fn run(login: Login, server: &[u8]) -> (BytesMut, Ready) {
        try_run(login, server).unwrap_or_else(|e| panic!("{e}"))
    }

    fn trust_server(npv: Option<(u32, &[&str])>, key_len: usize) -> BytesMut {
        let mut server = BytesMut::new();
        if let Some((minor, opts)) = npv {
            backend::negotiate_protocol_version(&mut server, minor, opts.iter().copied());
        }
        backend::authentication_ok(&mut server);
        backend::backend_key_data(&mut server, 4242, &vec![7; key_len]);
        backend::ready_for_query(&mut server, b'I');
        server
    }

    fn messages(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = peek_frame(b, 1 << 16).unwrap() {
            out.push((b[0], b[f.body()].to_vec()));
            b = &b[f.total_len..];
        }
        out
    }

    #[test]
    fn client_gets_tollgates_key_and_the_server_key_is_kept() {
        let (login, startup) = start_version(None, 0);
        assert_eq!(&startup[4..8], &(3u32 << 16).to_be_bytes());
        let (tc, ready) = run(login, &trust_server(None, 4));
        let msgs = messages(&tc);
        assert_eq!(msgs[1].0, b'K');
        assert_eq!(&msgs[1].1[..4], &4242u32.to_be_bytes());
        assert_eq!(&msgs[1].1[4..], &[0xab; 4]);
        let up = ready.upstream_key.unwrap();
        assert_eq!((up.process_id, &up.secret_key[..]), (4242, &[7u8; 4][..]));
        assert_eq!(ready.issued_key.unwrap().secret_key.len(), 4);
        assert_eq!(ready.minor, 0);
    }

    #[test]
    fn protocol_3_2_accepted_upstream_gives_a_long_key() {
        let (login, startup) = start_version(None, 2);
        assert_eq!(&startup[4..8], &((3u32 << 16) | 2).to_be_bytes());
        let (tc, ready) = run(login, &trust_server(None, 32));
        let msgs = messages(&tc);
        assert_eq!(msgs[0].0, b'R', "no negotiation when the server accepts");
        assert_eq!(msgs[1].1.len(), 4 + ISSUED_KEY_LEN);
        assert_eq!(ready.minor, 2);
        assert_eq!(ready.upstream_key.unwrap().secret_key.len(), 32);
    }

    #[test]
    fn server_negotiation_is_relayed_and_lowers_the_key() {
        let (login, _) = start_version(None, 2);
        let server = trust_server(Some((0, &["_pq_.x"])), 4);
        let (tc, ready) = run(login, &server);
        let msgs = messages(&tc);
        let sent = messages(&server);
        assert_eq!(msgs[0], sent[0], "NegotiateProtocolVersion verbatim");
        assert_eq!(msgs[2].1.len(), 8);
        assert_eq!(ready.minor, 0);
    }

    #[test]
    fn versions_beyond_3_2_are_capped_and_answered_by_tollgate() {
        let (login, startup) = start_version(None, 9);
        assert_eq!(&startup[4..8], &((3u32 << 16) | 2).to_be_bytes());
        let (tc, ready) = run(login, &trust_server(None, 32));
        let msgs = messages(&tc);
        assert_eq!(msgs[0].0, b'v');
        assert_eq!(&msgs[0].1[..8], &[0, 3, 0, 2, 0, 0, 0, 0]);
        assert_eq!(ready.minor, 2);
    }

    #[test]
    fn negotiation_without_reason_or_short_keys_are_refused() {
        // Offers exactly what was asked with no unrecognized option.
        let (login, _) = start_version(None, 2);
        let mut server = BytesMut::new();
        backend::negotiate_protocol_version(&mut server, 2, [].into_iter());
        let e = try_run(login, &server).err().unwrap();
        assert!(matches!(e, LoginError::Protocol { .. }));
        // A 3.0 session with a long key.
        let (login, _) = start_version(None, 0);
        let e = try_run(login, &trust_server(None, 32)).err().unwrap();
        assert!(matches!(e, LoginError::Protocol { .. }));
    }

    #[test]
    fn startup_sets_the_role_once() {
        let (_, s) = start(None);
        let text = String::from_utf8_lossy(&s);
        assert!(text.contains("user\0app\0"));
        assert!(!text.contains("ignored"));
        assert!(text.contains("database\0appdb\0"));
    }

    #[test]
    fn trust_login_collects_messages_for_the_client() {
        let (login, _) = start(None);
        let mut server = BytesMut::new();
        backend::authentication_ok(&mut server);
        backend::parameter_status(&mut server, "server_version", "15");
        backend::backend_key_data(&mut server, 1, &[0, 0, 0, 1]);
        backend::ready_for_query(&mut server, b'I');
        let (tc, ready) = run(login, &server);
        assert_eq!(ready.auth_method, "trust");
        // Everything verbatim except the key's secret, which is tollgate's:
        // the process id is the backend's own.
        let mut expected = BytesMut::new();
        backend::authentication_ok(&mut expected);
        backend::parameter_status(&mut expected, "server_version", "15");
        backend::backend_key_data(&mut expected, 1, &ISSUED[..4]);
        backend::ready_for_query(&mut expected, b'I');
        assert_eq!(tc, expected);
    }

    #[test]
    fn password_request_without_credentials_is_rejected() {
        let (login, _) = start(None);
        let mut m = BytesMut::new();
        m.extend_from_slice(b"R\0\0\0\x08\0\0\0\x03");
        let e = login
            .on_message(
                &m,
                &mut BytesMut::new(),
                &mut BytesMut::new(),
                &mut KeyCache::new(),
            )
            .err()
            .unwrap();
        assert!(matches!(e, LoginError::Rejected { .. }));
        assert!(!e.to_string().contains("secret"));
    }

    #[test]
    fn cleartext_and_md5_send_the_configured_password() {
        let (login, _) = start(Some("secret"));
        let mut ts = BytesMut::new();
        login
            .on_message(
                b"R\0\0\0\x08\0\0\0\x03",
                &mut ts,
                &mut BytesMut::new(),
                &mut KeyCache::new(),
            )
            .ok()
            .unwrap();
        assert_eq!(&ts[..], b"p\0\0\0\x0bsecret\0");
        let (login, _) = start(Some("secret"));
        let mut ts = BytesMut::new();
        login
            .on_message(
                b"R\0\0\0\x0c\0\0\0\x05abcd",
                &mut ts,
                &mut BytesMut::new(),
                &mut KeyCache::new(),
            )
            .ok()
            .unwrap();
        assert!(ts.starts_with(b"p") && ts[5..].starts_with(b"md5"));
    }

    #[test]
    fn auth_errors_are_rejections_other_errors_are_relayed() {
        let mut e = BytesMut::new();
        backend::error_response(
            &mut e,
            backend::Severity::Fatal,
            crate::protocol::sqlstate::INVALID_PASSWORD,
            "password authentication failed for user \"app\"",
            None,
        );
        let (login, _) = start(Some("x"));
        let err = login
            .on_message(
                &e,
                &mut BytesMut::new(),
                &mut BytesMut::new(),
                &mut KeyCache::new(),
            )
            .err()
            .unwrap();
        assert!(matches!(err, LoginError::Rejected { .. }));

        let mut e = BytesMut::new();
        backend::error_response(
            &mut e,
            backend::Severity::Fatal,
            crate::protocol::sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
            None,
        );
        let (login, _) = start(Some("x"));
        match login.on_message(
            &e,
            &mut BytesMut::new(),
            &mut BytesMut::new(),
            &mut KeyCache::new(),
        ) {
            Err(LoginError::ServerError { code, response }) => {
                assert_eq!(code, "53300");
                assert_eq!(response, e.to_vec());
            }
            _ => panic!("expected a relayed server error"),
        }
    }

    /// A server that never sends ReadyForQuery cannot make tollgate hold
    /// more than MAX_LOGIN_RELAY_LEN bytes for the client.
    #[test]
    fn endless_parameter_status_is_bounded() {
        let (mut login, _) = start(None);
        let mut cache = KeyCache::new();
        let (mut ts, mut tc) = (BytesMut::new(), BytesMut::new());
        let mut ok = BytesMut::new();
        backend::authentication_ok(&mut ok);
        login = match login.on_message(&ok, &mut ts, &mut tc, &mut cache) {
            Ok(LoginStep::Continue(l)) => l,
            _ => panic!("AuthenticationOk"),
        };
        let mut status = BytesMut::new();
        backend::parameter_status(&mut status, "x", &"v".repeat(60 * 1024));
        for _ in 0..MAX_LOGIN_RELAY_LEN / status.len() + 1 {
            match login.on_message(&status, &mut ts, &mut tc, &mut cache) {
                Ok(LoginStep::Continue(l)) => login = l,
                Ok(LoginStep::Ready(_)) => panic!("no ReadyForQuery was sent"),
                Err(e) => {
                    assert!(matches!(e, LoginError::Protocol { .. }), "{e}");
                    assert!(tc.len() <= MAX_LOGIN_RELAY_LEN);
                    return;
                }
            }
        }
        panic!("{} bytes collected without an error", tc.len());
    }

    #[test]
    fn out_of_order_messages_are_protocol_errors() {
        let (login, _) = start(Some("x"));
        let mut m = BytesMut::new();
        backend::ready_for_query(&mut m, b'I');
        let err = login
            .on_message(
                &m,
                &mut BytesMut::new(),
                &mut BytesMut::new(),
                &mut KeyCache::new(),
            )
            .err()
            .unwrap();
        assert!(matches!(err, LoginError::Protocol { .. }));
        // SASL continue without a SASL start.
        let (login, _) = start(Some("x"));
        let err = login
            .on_message(
                b"R\0\0\0\x0a\0\0\0\x0bxx",
                &mut BytesMut::new(),
                &mut BytesMut::new(),
                &mut KeyCache::new(),
            )
            .err()
            .unwrap();
        assert!(matches!(err, LoginError::Protocol { .. }));
    }

    /// Hands one server message to a login started with the password
    /// "secret" that answers only `allowed`; the result and what went to
    /// the server and to the client.
    fn first_answer(
        allowed: &str,
        msg: &[u8],
    ) -> (Result<LoginStep, LoginError>, BytesMut, BytesMut) {
        let (login, _) = start(Some("secret"));
        let login = login.require(AuthMethods::parse(allowed).unwrap());
        let (mut ts, mut tc) = (BytesMut::new(), BytesMut::new());
        let step = login.on_message(msg, &mut ts, &mut tc, &mut KeyCache::new());
        (step, ts, tc)
    }

    /// Each authentication request a server can make, with the method
    /// that allows it and how the refusal names it.
    fn requests() -> [(&'static str, BytesMut, &'static str, &'static str); 4] {
        let mut ok = BytesMut::new();
        backend::authentication_ok(&mut ok);
        [
            (
                "cleartext",
                BytesMut::from(&b"R\0\0\0\x08\0\0\0\x03"[..]),
                "password",
                "a cleartext password",
            ),
            (
                "md5",
                BytesMut::from(&b"R\0\0\0\x0c\0\0\0\x05salt"[..]),
                "md5",
                "an md5 password",
            ),
            (
                "SASL",
                BytesMut::from(&b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"[..]),
                "scram-sha-256",
                "SASL (SCRAM)",
            ),
            ("AuthenticationOk at once", ok, "none", "no authentication"),
        ]
    }

    /// A request for a method `require_auth` leaves out is refused as
    /// Unsupported, naming the method, before anything is written: no
    /// password, no hash of one, no SCRAM client-first-message, and nothing
    /// for the client.
    #[test]
    fn require_refuses_other_methods_before_writing_anything() {
        let all = ["password", "md5", "scram-sha-256", "none"];
        for (what, msg, method, asked) in requests() {
            let others: Vec<&str> = all.iter().copied().filter(|m| *m != method).collect();
            let (step, ts, tc) = first_answer(&others.join(","), &msg);
            match step {
                Err(LoginError::Unsupported { detail }) => {
                    assert!(detail.contains(asked), "{what}: {detail}");
                    assert!(detail.contains("require_auth"), "{what}: {detail}");
                    assert!(!detail.contains("secret"), "{what}: {detail}");
                }
                Err(e) => panic!("{what}: {e}"),
                Ok(_) => panic!("{what}: answered although {method} is not allowed"),
            }
            assert!(ts.is_empty(), "{what}: {ts:?} went to the server");
            assert!(tc.is_empty(), "{what}: {tc:?} went to the client");
        }
    }

    /// Each method alone is enough for its own request.
    #[test]
    fn require_answers_the_methods_it_allows() {
        for (what, msg, method, _) in requests() {
            let (step, ts, tc) = first_answer(method, &msg);
            assert!(
                matches!(step, Ok(LoginStep::Continue(_))),
                "{what}: {:?}",
                step.err()
            );
            if method == "none" {
                assert!(ts.is_empty(), "{what}");
                assert_eq!(tc, msg, "{what}: AuthenticationOk for the client");
            } else {
                assert!(ts.starts_with(b"p"), "{what}: {ts:?}");
            }
        }
    }

    /// `none` left out refuses a server that skips authentication, not the
    /// AuthenticationOk that ends one: a password login still completes.
    #[test]
    fn require_without_none_accepts_ok_after_credentials() {
        let (login, _) = start(Some("secret"));
        let login = login.require(AuthMethods::parse("password").unwrap());
        let mut server = BytesMut::from(&b"R\0\0\0\x08\0\0\0\x03"[..]);
        server.extend_from_slice(&trust_server(None, 4));
        let (_, ready) = run(login, &server);
        assert_eq!(ready.auth_method, "password");
        // The same server without the password request is refused.
        let (login, _) = start(Some("secret"));
        let login = login.require(AuthMethods::parse("password").unwrap());
        let e = try_run(login, &trust_server(None, 4)).err().unwrap();
        assert!(matches!(e, LoginError::Unsupported { .. }), "{e}");
    }
}
