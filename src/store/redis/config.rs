//! How the Redis store is configured: the topology (standalone, Cluster or Sentinel) resolved from
//! the `[store]` keys `url`, `cluster`, `sentinels` and `master_name`, and the options the store
//! runs with. Nothing here connects; URLs are checked, and never shown with their credentials.

use std::time::Duration;

use crate::store::Windows;

/// How to reach Redis. Its `Debug` and `Display` never show credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (`redis://` or `rediss://`), reconnecting on its own.
    Standalone { url: String },
    /// A Redis Cluster, from one or more seed node URLs.
    Cluster { nodes: Vec<String> },
    /// A master found through Sentinel; re-resolved after a failover.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
        /// Credentials, database and TLS for the master, as a `redis://` URL without host meaning.
        master_url: Option<String>,
    },
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Topology({self})")
    }
}

impl std::fmt::Display for Topology {
    /// Describes the topology for logs, without credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topology::Standalone { url } => f.write_str(&redact_url(url)),
            Topology::Cluster { nodes } => {
                let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                write!(f, "cluster seeded by {}", nodes.join(","))
            }
            Topology::Sentinel { sentinels, master_name, .. } => {
                let sentinels: Vec<String> = sentinels.iter().map(|s| redact_url(s)).collect();
                write!(f, "master {master_name:?} from sentinels {}", sentinels.join(","))
            }
        }
    }
}

/// Everything the Redis store needs.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub topology: Topology,
    pub windows: Windows,
    /// Bound on connecting and on each call; past it the call fails as unavailable.
    pub timeout: Duration,
    /// How long a scope's tier and state stay after its last activity.
    pub state_ttl: Duration,
    /// Prefix of every key, so several deployments can share one Redis.
    pub key_prefix: String,
}

/// Strips the password (and user) from a Redis URL before it reaches a log line.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, String::new()), |(a, p)| (a, format!("/{p}")));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// The `[store]` keys that say where Redis is, as configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct TopologyConfig<'a> {
    /// `redis://`, `rediss://`, or `redis+sentinel://[user:pass@]host:port[,host:port]/master[/db]`;
    /// with `sentinels`, the master's credentials, database and TLS.
    pub url: Option<&'a str>,
    /// Treat `url` as a seed node of a Redis Cluster.
    pub cluster: bool,
    /// Sentinel addresses (`host:port` or `redis://host:port`), with `master_name`.
    pub sentinels: &'a [String],
    /// The master the sentinels watch.
    pub master_name: Option<&'a str>,
}

/// A topology that cannot work, naming the `[store]` key at fault. Never quotes the URL.
#[derive(Debug, thiserror::Error)]
#[error("store.{key}: {message}")]
pub struct TopologyError {
    /// The key within `[store]`: `url` or `master_name`.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(key: &'static str, message: impl Into<String>) -> TopologyError {
    TopologyError { key, message: message.into() }
}

impl TopologyConfig<'_> {
    /// Resolves and checks the topology: sentinels win, then a `redis+sentinel://` URL, then a
    /// plain URL (a Cluster seed when `cluster` is set).
    pub fn resolve(&self) -> Result<Topology, TopologyError> {
        let with_scheme = |a: &str| if a.contains("://") { a.to_owned() } else { format!("redis://{a}") };
        if !self.sentinels.is_empty() {
            let master_name = self
                .master_name
                .filter(|m| !m.is_empty())
                .ok_or_else(|| bad("master_name", "is required with store.sentinels"))?;
            return Ok(Topology::Sentinel {
                sentinels: self.sentinels.iter().map(|a| with_scheme(a)).collect(),
                master_name: master_name.to_owned(),
                master_url: self.url.map(str::to_owned),
            });
        }
        let url = self.url.ok_or_else(|| bad("url", "is required with the redis backend"))?;
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return parse_sentinel_url(rest);
        }
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(bad("url", "must start with redis://, rediss:// or redis+sentinel://"));
        }
        redis::Client::open(url).map_err(|e| bad("url", e.to_string()))?;
        let url = url.to_owned();
        if self.cluster {
            Ok(Topology::Cluster { nodes: vec![url] })
        } else {
            Ok(Topology::Standalone { url })
        }
    }
}

/// `[user:pass@]host:port[,host:port...]/master_name[/db]`: credentials and db are the master's.
fn parse_sentinel_url(rest: &str) -> Result<Topology, TopologyError> {
    let malformed = |m: &str| {
        bad("url", format!("{m}; expected redis+sentinel://[user:pass@]host:port[,host:port]/master_name[/db]"))
    };
    let (authority, path) = rest.split_once('/').ok_or_else(|| malformed("no master name"))?;
    let (creds, hosts) = authority.rsplit_once('@').map_or((None, authority), |(c, h)| (Some(c), h));
    let mut path = path.split('/');
    let master_name = path.next().filter(|m| !m.is_empty()).ok_or_else(|| malformed("no master name"))?.to_owned();
    let db = path.next().filter(|d| !d.is_empty());
    if let Some(db) = db {
        db.parse::<u32>().map_err(|_| malformed("the database must be a number"))?;
    }
    let sentinels: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect();
    if sentinels.is_empty() {
        return Err(malformed("no sentinel address"));
    }
    let master_url = (creds.is_some() || db.is_some()).then(|| {
        format!("redis://{}localhost/{}", creds.map(|c| format!("{c}@")).unwrap_or_default(), db.unwrap_or("0"))
    });
    Ok(Topology::Sentinel { sentinels, master_name, master_url })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("redis://user:s3cret@db:6379/2"), "redis://***@db:6379/2");
        assert_eq!(redact_url("rediss://:pw@db:6380"), "rediss://***@db:6380");
        assert_eq!(redact_url("redis://db:6379"), "redis://db:6379");
        assert!(!redact_url("redis+sentinel://u:pw@s1:26379,s2:26379/mymaster").contains("pw"));
    }

    #[test]
    fn topologies_resolve() {
        let url = |u| TopologyConfig { url: Some(u), ..TopologyConfig::default() };
        assert_eq!(url("redis://h:1").resolve().unwrap(), Topology::Standalone { url: "redis://h:1".into() });
        let cluster = TopologyConfig { cluster: true, ..url("rediss://h:1") };
        assert_eq!(cluster.resolve().unwrap(), Topology::Cluster { nodes: vec!["rediss://h:1".into()] });
        assert_eq!(
            url("redis+sentinel://s1:26379/mymaster").resolve().unwrap(),
            Topology::Sentinel {
                sentinels: vec!["redis://s1:26379".into()],
                master_name: "mymaster".into(),
                master_url: None,
            }
        );
        let sentinels = ["s1:26379".to_string(), "redis://s2:26379".to_string()];
        let named = TopologyConfig { sentinels: &sentinels, master_name: Some("m"), ..TopologyConfig::default() };
        assert_eq!(
            named.resolve().unwrap(),
            Topology::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master_name: "m".into(),
                master_url: None,
            }
        );
        assert_eq!(TopologyConfig { master_name: Some(""), ..named }.resolve().unwrap_err().key, "master_name");
    }

    #[test]
    fn bad_sentinel_urls_are_named_without_their_credentials() {
        for u in ["redis+sentinel://:pw@s1:26379", "redis+sentinel://:pw@/m", "redis+sentinel://:pw@s1:1/m/x"] {
            let e = TopologyConfig { url: Some(u), ..TopologyConfig::default() }.resolve().unwrap_err();
            assert_eq!(e.key, "url");
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }
}
