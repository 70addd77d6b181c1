//! TLS and SASL settings (the `tls` feature): [`KafkaTls`] and [`KafkaSasl`].

use std::path::PathBuf;

use crate::config::REDACTED;

/// Where a certificate or key comes from.
#[derive(Clone, PartialEq, Eq)]
enum Source {
    /// A PEM file, read by librdkafka when the client starts.
    File(PathBuf),
    /// PEM text.
    Pem(String),
}

impl Source {
    /// `(file property, PEM property)` -> the property and value to set.
    fn property(&self, file: &'static str, pem: &'static str) -> (&'static str, String) {
        match self {
            Self::File(path) => (file, path.display().to_string()),
            Self::Pem(text) => (pem, text.clone()),
        }
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Pem(text) => write!(f, "Pem({} bytes)", text.len()),
        }
    }
}

/// TLS to the brokers, with the broker's certificate and host name always verified.
///
/// Set with [`KafkaConfig::with_tls`](crate::KafkaConfig::with_tls). Every client this crate
/// creates then connects with `security.protocol=SSL` (or `SASL_SSL` with
/// [`KafkaSasl`]), checks that the broker's certificate chains to the CA given here (the
/// system's trusted CAs, OpenSSL's default paths, when none is given) and that it is valid for
/// the host name or IP address the client connects to
/// (`ssl.endpoint.identification.algorithm=https`). A broker that fails either check is never
/// talked to, in TLS or in plaintext: [`check_connection`](crate::check_connection) and the
/// `connect` constructors fail with [`Error::Tls`](crate::Error::Tls).
///
/// ```
/// use es_kafka::{KafkaConfig, KafkaTls};
///
/// let config = KafkaConfig::new("kafka-1.internal:9093")
///     .with_tls(KafkaTls::new().with_ca_file("/etc/es/kafka-ca.pem"));
/// assert!(config
///     .producer_settings()
///     .contains(&("security.protocol".to_owned(), "SSL".to_owned())));
/// ```
///
/// `Debug` shows the file names and the size of PEM text, never a private key or its password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaTls {
    ca: Option<Source>,
    client: Option<(Source, Source)>,
    key_password: Option<String>,
}

impl KafkaTls {
    /// TLS trusting the system's CAs (OpenSSL's default certificate paths).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts only the CA certificates in the PEM file at `path` (`ssl.ca.location`).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(Source::File(path.into()));
        self
    }

    /// Trusts only the CA certificates in `pem` (`ssl.ca.pem`).
    pub fn with_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.ca = Some(Source::Pem(pem.into()));
        self
    }

    /// Authenticates the client with the certificate and private key in these PEM files
    /// (`ssl.certificate.location`, `ssl.key.location`), for brokers that ask for one.
    pub fn with_client_certificate_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.client = Some((Source::File(cert.into()), Source::File(key.into())));
        self
    }

    /// Authenticates the client with this certificate and private key, as PEM text
    /// (`ssl.certificate.pem`, `ssl.key.pem`).
    pub fn with_client_certificate_pem(
        mut self,
        cert: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        self.client = Some((Source::Pem(cert.into()), Source::Pem(key.into())));
        self
    }

    /// The password of an encrypted client key (`ssl.key.password`).
    pub fn with_key_password(mut self, password: impl Into<String>) -> Self {
        self.key_password = Some(password.into());
        self
    }

    /// The librdkafka properties, without `security.protocol`.
    pub(crate) fn properties(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("enable.ssl.certificate.verification", "true".to_owned()),
            ("ssl.endpoint.identification.algorithm", "https".to_owned()),
        ];
        if let Some(ca) = &self.ca {
            out.push(ca.property("ssl.ca.location", "ssl.ca.pem"));
        }
        if let Some((cert, key)) = &self.client {
            out.push(cert.property("ssl.certificate.location", "ssl.certificate.pem"));
            out.push(key.property("ssl.key.location", "ssl.key.pem"));
        }
        if let Some(password) = &self.key_password {
            out.push(("ssl.key.password", password.clone()));
        }
        out
    }

    /// The values an error or log line must not show: the key password and a PEM key.
    pub(crate) fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((_, Source::Pem(key))) = &self.client {
            out.push(key.clone());
        }
        out.extend(self.key_password.clone());
        out
    }
}

impl std::fmt::Debug for KafkaTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Client<'a>(&'a Source);
        impl std::fmt::Debug for Client<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("ClientCertificate")
                    .field("cert", self.0)
                    .field("key", &REDACTED)
                    .finish()
            }
        }
        f.debug_struct("KafkaTls")
            .field("ca", &self.ca)
            .field(
                "client",
                &self.client.as_ref().map(|(cert, _)| Client(cert)),
            )
            .field(
                "key_password",
                &self.key_password.as_ref().map(|_| REDACTED),
            )
            .finish()
    }
}

/// A SASL mechanism of [`KafkaSasl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaslMechanism {
    /// `SCRAM-SHA-256`: a challenge and response; the password never crosses the network.
    ScramSha256,
    /// `SCRAM-SHA-512`, likewise.
    ScramSha512,
    /// `PLAIN`: the password is sent as it is, so only over TLS.
    Plain,
}

impl SaslMechanism {
    /// The name librdkafka and the brokers use.
    pub fn name(self) -> &'static str {
        match self {
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::Plain => "PLAIN",
        }
    }
}

impl std::fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SASL authentication to the brokers: a user name and password, by SCRAM or `PLAIN`.
///
/// Set with [`KafkaConfig::with_sasl`](crate::KafkaConfig::with_sasl), normally together with
/// [`KafkaTls`] (`security.protocol=SASL_SSL`). Without TLS it is refused
/// ([`Error::InvalidSetting`](crate::Error::InvalidSetting)) unless
/// [`KafkaConfig::allow_sasl_without_tls`](crate::KafkaConfig::allow_sasl_without_tls) says
/// otherwise, and `PLAIN` is refused without TLS in any case: it sends the password as it is.
/// Wrong credentials fail [`check_connection`](crate::check_connection) and the `connect`
/// constructors with [`Error::Authentication`](crate::Error::Authentication).
///
/// `Debug` shows the mechanism only: the user name and password are `***` (librdkafka treats
/// both as sensitive), and no error or log line of this crate shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSasl {
    mechanism: SaslMechanism,
    username: String,
    password: String,
}

impl KafkaSasl {
    /// `SCRAM-SHA-256` as `username`.
    pub fn scram_sha_256(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::new(SaslMechanism::ScramSha256, username, password)
    }

    /// `SCRAM-SHA-512` as `username`.
    pub fn scram_sha_512(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::new(SaslMechanism::ScramSha512, username, password)
    }

    /// `PLAIN` as `username` (only over TLS).
    pub fn plain(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::new(SaslMechanism::Plain, username, password)
    }

    /// `mechanism` as `username`.
    pub fn new(
        mechanism: SaslMechanism,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            mechanism,
            username: username.into(),
            password: password.into(),
        }
    }

    /// The mechanism.
    pub fn mechanism(&self) -> SaslMechanism {
        self.mechanism
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The librdkafka properties, without `security.protocol`.
    pub(crate) fn properties(&self) -> Vec<(&'static str, String)> {
        vec![
            ("sasl.mechanism", self.mechanism.name().to_owned()),
            ("sasl.username", self.username.clone()),
            ("sasl.password", self.password.clone()),
        ]
    }

    /// The values an error or log line must not show.
    pub(crate) fn secrets(&self) -> Vec<String> {
        vec![self.password.clone()]
    }
}

impl std::fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("username", &REDACTED)
            .field("password", &REDACTED)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_key_or_password() {
        let tls = KafkaTls::new()
            .with_ca_pem("-----BEGIN CERTIFICATE----- ca")
            .with_client_certificate_pem("-----BEGIN CERTIFICATE----- cert", "key-pem-s3cret")
            .with_key_password("keypw-s3cret");
        let sasl = KafkaSasl::scram_sha_512("user-s3cret", "pw-s3cret");
        for shown in [
            format!("{tls:?}"),
            format!("{tls:#?}"),
            format!("{sasl:?}"),
            format!("{sasl:#?}"),
        ] {
            assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
        }
        assert!(format!("{sasl:?}").contains("ScramSha512"));
        let files = KafkaTls::new()
            .with_ca_file("/etc/es/ca.pem")
            .with_client_certificate_files("/etc/es/client.pem", "/etc/es/client-s3cret.key");
        let shown = format!("{files:?}");
        assert!(shown.contains("/etc/es/ca.pem") && shown.contains("/etc/es/client.pem"));
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn verification_is_always_on() {
        let properties = KafkaTls::new().properties();
        assert!(properties.contains(&("enable.ssl.certificate.verification", "true".into())));
        assert!(properties.contains(&("ssl.endpoint.identification.algorithm", "https".into())));
    }
}
