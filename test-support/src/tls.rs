//! Test certificates made with the `openssl` command: a CA, a server certificate it signs for
//! `localhost` and `127.0.0.1`, one for `localhost` alone, one for another host name, a client
//! certificate, and a second, unrelated CA.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{on_path, run, Result, ServerError};

/// How to install the `openssl` command on Debian and Ubuntu, for error messages.
pub const OPENSSL_INSTALL: &str = "apt-get install -y openssl";

/// Certificates for a TLS server on loopback, as PEM files in one directory.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA that signed the server's certificate.
    pub ca_cert: PathBuf,
    /// A CA that signed nothing here: trusting only it must fail.
    pub other_ca_cert: PathBuf,
    /// The server's certificate, valid for `localhost` and `127.0.0.1` only.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A certificate the CA signed for `redis.invalid` only: a server on 127.0.0.1 using it
    /// must fail host name verification.
    pub wrong_host_cert: PathBuf,
    /// Its private key.
    pub wrong_host_key: PathBuf,
    /// A certificate the CA signed for the host name `localhost` only, without the address
    /// 127.0.0.1: a server on loopback using it passes host name verification when reached as
    /// `localhost` and fails it when reached by its IP address.
    pub localhost_only_cert: PathBuf,
    /// Its private key.
    pub localhost_only_key: PathBuf,
    /// A client certificate signed by the CA (for servers that authenticate clients).
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

impl TestCerts {
    /// Generates the certificates into `dir` (EC P-256 keys, valid for a day).
    pub fn generate(dir: &Path) -> Result<Self> {
        let Some(program) = on_path("openssl") else {
            return Err(ServerError(format!(
                "openssl is not on PATH: the TLS tests make their certificates with it; install \
                 it with `{OPENSSL_INSTALL}` (or let `cargo xtask test` install it)"
            )));
        };
        fs::create_dir_all(dir)?;
        let openssl = Openssl {
            program,
            dir: dir.canonicalize()?,
        };
        openssl.ca("ca", "/CN=es test CA")?;
        openssl.ca("other-ca", "/CN=es other CA")?;
        openssl.leaf(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl.leaf(
            "wrong-host",
            "/CN=redis.invalid",
            "subjectAltName=DNS:redis.invalid\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl.leaf(
            "localhost-only",
            "/CN=localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl.leaf("client", "/CN=es client", "extendedKeyUsage=clientAuth\n")?;
        let path = |name: &str| openssl.dir.join(name);
        Ok(Self {
            ca_cert: path("ca.crt"),
            other_ca_cert: path("other-ca.crt"),
            server_cert: path("server.crt"),
            server_key: path("server.key"),
            wrong_host_cert: path("wrong-host.crt"),
            wrong_host_key: path("wrong-host.key"),
            localhost_only_cert: path("localhost-only.crt"),
            localhost_only_key: path("localhost-only.key"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
        })
    }
}

/// The `openssl` command, run in the certificates' directory.
struct Openssl {
    program: PathBuf,
    dir: PathBuf,
}

impl Openssl {
    fn run(&self, args: &[&str], what: &str) -> Result<()> {
        run(
            Command::new(&self.program)
                .args(args)
                .current_dir(&self.dir)
                .stdin(Stdio::null()),
            what,
        )
        .map(drop)
    }

    /// An EC P-256 key, `<name>.key`.
    fn key(&self, name: &str) -> Result<()> {
        let out = format!("{name}.key");
        self.run(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &out,
            ],
            "openssl genpkey",
        )
    }

    /// A self-signed CA, `<name>.key` and `<name>.crt`.
    fn ca(&self, name: &str, subject: &str) -> Result<()> {
        self.key(name)?;
        let (key, out) = (format!("{name}.key"), format!("{name}.crt"));
        self.run(
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &key,
                "-days",
                "1",
                "-subj",
                subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                &out,
            ],
            "openssl req (CA)",
        )
    }

    /// `<name>.key` and `<name>.crt`, signed by `ca`, with the X.509 extensions `ext`.
    fn leaf(&self, name: &str, subject: &str, ext: &str) -> Result<()> {
        self.key(name)?;
        let (key, csr, ext_file, out) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
            format!("{name}.crt"),
        );
        self.run(
            &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
            "openssl req (CSR)",
        )?;
        fs::write(self.dir.join(&ext_file), ext)?;
        self.run(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext_file,
                "-out",
                &out,
            ],
            "openssl x509 (sign)",
        )
    }
}
