//! `[[listener.route]]`: one listener serving several upstreams by the
//! request's host, and [`HostPattern`], the host a route matches.
//!
//! Matching rules (the README's "Routing" section says the same):
//!
//! * A pattern is a host name, an IP literal (`10.0.0.5`, `[::1]`), or `*.`
//!   followed by a host name, optionally with `:port`. Names compare
//!   case-insensitively, and a trailing dot (`api.internal.`) is ignored on
//!   both sides.
//! * `*.internal` matches a name ending in `.internal` at any depth
//!   (`a.internal`, `a.b.internal`) but not `internal` itself — as Envoy's
//!   and nginx's leading wildcards do.
//! * A pattern without a port matches the host on any port; one with a port
//!   matches only that port, a request without one being on port 80 (plain
//!   HTTP's).
//! * Routes are tried in the order written; the first match wins, and a
//!   request no route matches goes to the listener's `upstream` when it has
//!   one, else gets 403 `no-route`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Problems;

/// The port a request without one in its host is on: tether's listeners
/// speak plain HTTP.
const DEFAULT_PORT: u16 = 80;

/// `[[listener.route]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The request hosts this route serves: `"api.internal"`,
    /// `"*.internal"`, `"api.internal:8080"`. Required (the default, unset,
    /// stands in for a malformed one so that later routes keep their index
    /// in the problems reported).
    #[serde(default)]
    pub host: HostPattern,
    /// Name of the `[[upstream]]` whose pool serves them.
    pub upstream: String,
}

impl RouteConfig {
    /// A route of `host` to the upstream named `upstream`.
    pub fn new(host: HostPattern, upstream: &str) -> Self {
        Self {
            host,
            upstream: upstream.to_owned(),
        }
    }
}

/// Whether a pattern is one name or every name under a domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
enum Kind {
    /// The name itself.
    #[default]
    Exact,
    /// Every name ending in `.` + the name, at any depth.
    Subdomains,
}

/// The host a route matches, parsed and lower-cased at load so a lookup
/// compares bytes and allocates nothing. The default is unset and matches
/// nothing; validation refuses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct HostPattern {
    kind: Kind,
    /// Lower case, without the trailing dot; for [`Kind::Subdomains`] with
    /// its leading dot (`.internal`), so a match is a suffix compare.
    name: String,
    port: Option<u16>,
}

impl HostPattern {
    /// Whether a request for `host` (a host name or IP literal, as
    /// [`split_authority`] gives it) on `port` is one this pattern serves.
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        if self.name.is_empty() {
            return false;
        }
        if let Some(wanted) = self.port {
            if port.unwrap_or(DEFAULT_PORT) != wanted {
                return false;
            }
        }
        let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
        let name = self.name.as_bytes();
        match self.kind {
            Kind::Exact => host.eq_ignore_ascii_case(name),
            Kind::Subdomains => {
                host.len() > name.len()
                    && host[host.len() - name.len()..].eq_ignore_ascii_case(name)
            }
        }
    }
}

/// Splits a request's authority (a Host header or an absolute-form target's
/// authority) into its host and port, without allocating: userinfo is
/// dropped, brackets stay on an IPv6 literal, and a port that is not a
/// number is no port.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = match authority.strip_prefix('[') {
        Some(_) => match authority.find(']') {
            Some(end) => (&authority[..=end], authority[end + 1..].strip_prefix(':')),
            None => (authority, None),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    (host, port.and_then(|p| p.parse().ok()))
}

/// Whether `name` is a host name (dot-separated labels of letters, digits,
/// `-` and `_`) or an IPv4 literal, which has the same shape.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = match text.strip_prefix("*.") {
            Some(rest) => (Kind::Subdomains, rest),
            None => (Kind::Exact, text),
        };
        let (host, port) = match rest.strip_prefix('[') {
            Some(_) => match rest.find(']') {
                Some(end) => (&rest[..=end], rest[end + 1..].strip_prefix(':')),
                None => return Err(format!("{text:?}: an IPv6 literal lacks its ']'")),
            },
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => return Err(format!("{text:?}: the port must be 1 to 65535")),
            },
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let literal = host.starts_with('[')
            && host[1..host.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok();
        if literal && kind == Kind::Subdomains {
            return Err(format!("{text:?}: an IP literal has no subdomains"));
        }
        if !literal && !is_host_name(host) {
            return Err(format!(
                "{text:?} is not a host pattern: expected a host name, an IP literal, or \"*.\" \
                 and a host name (a wildcard only as the whole first label), optionally with :port"
            ));
        }
        let mut name = host.to_ascii_lowercase();
        if kind == Kind::Subdomains {
            name.insert(0, '.');
        }
        Ok(Self { kind, name, port })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::Subdomains {
            f.write_str("*")?;
        }
        f.write_str(&self.name)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks one listener's routes, under `listener[i]`: each names an
/// upstream that exists, and none repeats an earlier pattern (it could
/// never be chosen).
pub(super) fn validate(
    routes: &[RouteConfig],
    upstream_exists: impl Fn(&str) -> bool,
    problems: &mut Problems<'_>,
) {
    let mut first_of: HashMap<&HostPattern, usize> = HashMap::new();
    for (j, route) in routes.iter().enumerate() {
        let mut route_problems = problems.within(&format!("route[{j}]"));
        if route.host == HostPattern::default() {
            route_problems.add("host", "must be set");
            continue;
        }
        if !upstream_exists(&route.upstream) {
            route_problems.add(
                "upstream",
                format!("no [[upstream]] is named {:?}", route.upstream),
            );
        }
        if let Some(earlier) = first_of.insert(&route.host, j) {
            first_of.insert(&route.host, earlier);
            route_problems.add(
                "host",
                format!(
                    "{} is route[{earlier}]'s pattern too: this route is never chosen",
                    route.host
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        text.parse().unwrap()
    }

    fn matches(pattern_text: &str, authority: &str) -> bool {
        let (host, port) = split_authority(authority);
        pattern(pattern_text).matches(host, port)
    }

    #[test]
    fn exact_names_match_case_insensitively_on_any_port_unless_one_is_given() {
        assert!(matches("api.internal", "api.internal"));
        assert!(matches("api.internal", "API.Internal:8080"));
        assert!(matches("Api.Internal.", "api.internal."));
        assert!(!matches("api.internal", "xapi.internal"));
        assert!(!matches("api.internal", "a.api.internal"));
        assert!(matches("api.internal:8080", "api.internal:8080"));
        assert!(!matches("api.internal:8080", "api.internal"));
        assert!(!matches("api.internal:8080", "api.internal:9090"));
        assert!(matches("api.internal:80", "api.internal"));
        assert!(matches("[::1]:8080", "[::1]:8080"));
        assert!(matches("10.0.0.5", "user:pw@10.0.0.5:81"));
    }

    #[test]
    fn a_leading_wildcard_matches_subdomains_at_any_depth_but_not_the_domain() {
        assert!(matches("*.internal", "a.internal"));
        assert!(matches("*.internal", "a.b.INTERNAL:8080"));
        assert!(!matches("*.internal", "internal"));
        assert!(!matches("*.internal", "ainternal"));
        assert!(!matches("*.internal", "a.internal.example"));
    }

    #[test]
    fn malformed_patterns_are_refused_and_good_ones_print_as_parsed() {
        for bad in [
            "",
            "*",
            "*.",
            "a.*.b",
            "api*.internal",
            "api..internal",
            "api internal",
            "api.internal:0",
            "api.internal:http",
            "*.[::1]",
            "[::1",
            "a/b",
            "*.*.a",
        ] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?} was accepted");
        }
        for (text, printed) in [
            ("API.internal", "api.internal"),
            ("*.Internal.", "*.internal"),
            ("api.internal:8080", "api.internal:8080"),
            ("[::1]:80", "[::1]:80"),
        ] {
            assert_eq!(pattern(text).to_string(), printed);
        }
    }

    #[test]
    fn authorities_split_without_their_userinfo() {
        assert_eq!(split_authority("a.b:81"), ("a.b", Some(81)));
        assert_eq!(split_authority("a.b"), ("a.b", None));
        assert_eq!(split_authority("u:p@a.b"), ("a.b", None));
        assert_eq!(split_authority("[::1]:8"), ("[::1]", Some(8)));
        assert_eq!(split_authority("[::1]"), ("[::1]", None));
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::{Config, ConfigError};

    const UPSTREAMS: &str = r#"
        [[upstream]]
        name = "api"
        endpoints = ["127.0.0.1:9000"]
    "#;

    fn problems(listeners: &str) -> Vec<String> {
        match Config::from_toml(&format!("{listeners}{UPSTREAMS}")) {
            Err(ConfigError::Invalid(found)) => found.into_iter().map(|p| p.to_string()).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn route_problems_are_reported_with_their_key_paths() {
        let found = problems(
            r#"
            [[listener]]
            name = "a"
            listen = "127.0.0.1:8080"
            [[listener.route]]
            host = "api.internal"
            upstream = "api"
            [[listener.route]]
            host = "a.*.internal"
            upstream = "api"
            [[listener.route]]
            host = "*.internal"
            upstream = "missing"
            [[listener.route]]
            host = "API.internal"
            upstream = "api"
            [[listener]]
            name = "b"
            listen = "127.0.0.1:8081"
            "#,
        );
        let keys: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap_or_default())
            .collect();
        assert_eq!(
            keys,
            [
                "listener[0].route[1].host",
                "listener[0].route[2].upstream",
                "listener[0].route[3].host",
                "listener[1].upstream",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn a_listener_with_routes_needs_no_default_and_round_trips() {
        let text = format!(
            r#"
            [[listener]]
            name = "a"
            listen = "127.0.0.1:8080"
            [[listener.route]]
            host = "*.Internal"
            upstream = "api"
            {UPSTREAMS}"#
        );
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(config.listeners[0].default_upstream(), None);
        assert_eq!(config.listeners[0].routes[0].host.to_string(), "*.internal");
        assert_eq!(Config::from_toml(&config.to_toml()).unwrap(), config);
    }
}
