//! Secrets in the configuration (passwords in connection URLs, librdkafka's secret properties):
//! which inputs hold one, and how they are shown everywhere else: as [`MASK`]. Every binary of
//! the workspace shows its URLs and Kafka properties through this module, so that `--help`, logs,
//! errors and Debug prints of a configuration never carry a password.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// What a secret is shown as.
pub const MASK: &str = "***";

/// Whether a librdkafka property holds a secret, by its key: passwords, private keys, OAuth
/// client secrets and tokens, and a Java client's JAAS line (which carries the password). Goes
/// by key, not value, so that the rule does not depend on what a secret looks like.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "passphrase",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
        "private",
        "token",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
        || k.ends_with(".key")
}

/// `url` with its password (`scheme://user:password@host...`) replaced by [`MASK`]; a URL
/// without one is returned as it is.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    match password_range(url) {
        Some(r) => Cow::Owned(format!("{}{MASK}{}", &url[..r.start], &url[r.end..])),
        None => Cow::Borrowed(url),
    }
}

/// Where the password of `url` is: from the first ':' after the scheme to the last '@' (a URL
/// parser splits the user info off at the last '@' too, so an unencoded '@' in the password
/// does not expose its tail). A '@' later in the path or query makes more hidden, never less.
fn password_range(url: &str) -> Option<Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let at = rest.rfind('@')?;
    let colon = rest[..at].find(':')?;
    (colon + 1 < at).then(|| start + colon + 1..start + at)
}

/// A connection URL that may carry a password (MySQL, MongoDB, HTTP). `Display` and `Debug` show
/// it without the password; [`SecretUrl::expose`] gives the URL itself, for the client that
/// connects with it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its password: only for the client that connects, never for a message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl")
            .field(&redact_url(&self.0))
            .finish()
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<SecretUrl, Self::Err> {
        Ok(SecretUrl::new(s))
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> SecretUrl {
        SecretUrl::new(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_masked() {
        for (url, shown) in [
            (
                "mysql://u:hunter2@127.0.0.1:3306/db",
                "mysql://u:***@127.0.0.1:3306/db",
            ),
            (
                "mongodb://admin:p%40ss@h1:27017,h2:27017/?authSource=admin",
                "mongodb://admin:***@h1:27017,h2:27017/?authSource=admin",
            ),
            // An unencoded '@' or ':' in the password: all of it is hidden.
            ("mysql://u:a@b:c@host/db", "mysql://u:***@host/db"),
            ("http://u:pw@scheduler:8000", "http://u:***@scheduler:8000"),
            // No scheme: the same rule.
            ("u:pw@host:3306", "u:***@host:3306"),
            // Nothing to hide.
            (
                "mysql://messagescheduler@127.0.0.1:3306/db",
                "mysql://messagescheduler@127.0.0.1:3306/db",
            ),
            ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017"),
            ("mysql://u:@host/db", "mysql://u:@host/db"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            let secret = SecretUrl::from(url);
            assert_eq!(secret.to_string(), shown);
            assert_eq!(format!("{secret:?}"), format!("SecretUrl({shown:?})"));
            assert_eq!(secret.expose(), url);
        }
    }

    #[test]
    fn secret_keys() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.truststore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "SASL.JAAS.CONFIG",
            "some.api.key",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "security.protocol",
            "sasl.mechanism",
            "sasl.username",
            "ssl.ca.location",
            "ssl.key.location",
            "client.id",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }
}
