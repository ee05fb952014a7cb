//! This server as one node of several sharing a PostgreSQL database: its
//! identity, kept in the data directory across restarts; its heartbeat; the
//! sweep that fails the work of nodes whose heartbeat stopped; and the
//! fence that stops this node's own work when it could not renew its lease
//! for as long as the others wait before they declare it lost.
//!
//! Why a lease and not only the database's view: a node cut off from the
//! database cannot learn that the others failed its executions. Once its
//! own heartbeat has failed for `lost_after_ms`, the others may have, so it
//! stops them itself (`node_lost`) rather than run work whose record is
//! final elsewhere.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_backend::TerminationReason;
use airlock_store::{NodeRecord, now_ms};

use crate::{AppState, ServeError};

/// Who this node is.
#[derive(Debug, Clone)]
pub struct Node {
    /// `nd_` and 32 lowercase hex digits.
    pub id: String,
    /// Operator's name (the host name by default).
    pub name: String,
    /// Where the other nodes reach its API.
    pub url: Option<String>,
    /// Its lease (`node.lost_after_ms`), written with its record: the
    /// others wait this long after its last heartbeat.
    pub lost_after_ms: i64,
}

const ID_FILE: &str = "node_id";

pub(crate) fn valid_id(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("nd_")
        && s[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The id in the data directory, made on the first start. A file that is
/// there but not an id is an error, never silently replaced: the id is
/// what this node's records on a shared database name.
pub fn load_or_create_id(data_dir: &Path) -> Result<String, ServeError> {
    let path = data_dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if valid_id(id) {
                Ok(id.to_string())
            } else {
                Err(ServeError::Setup(format!(
                    "{} does not hold a node id (nd_ and 32 hex digits)",
                    path.display()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = airlock_store::new_id("nd");
            // Written beside, then renamed: a crash never leaves half an id.
            let tmp = data_dir.join(format!("{ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| ServeError::Setup(format!("{}: {e}", path.display())))?;
            Ok(id)
        }
        Err(e) => Err(ServeError::Setup(format!("{}: {e}", path.display()))),
    }
}

/// The host's name as a node name (letters, digits, `.`, `_`, `-`).
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(64)
        .collect();
    if name.is_empty() { "node".into() } else { name }
}

/// This node's URL for the others: the configured one, else the listen
/// address when it names one interface.
pub fn advertised_url(
    configured: Option<&str>,
    local: std::net::SocketAddr,
    tls: bool,
) -> Option<String> {
    if let Some(u) = configured {
        return Some(u.trim_end_matches('/').to_string());
    }
    if local.ip().is_unspecified() {
        return None;
    }
    let scheme = if tls { "https" } else { "http" };
    Some(format!("{scheme}://{local}"))
}

/// The record this node registers with.
pub fn record(node: &Node) -> NodeRecord {
    let now = now_ms();
    NodeRecord {
        id: node.id.clone(),
        name: node.name.clone(),
        url: node.url.clone(),
        pid: std::process::id(),
        started_at_ms: now,
        heartbeat_at_ms: now,
        state: "active".into(),
        lost_after_ms: node.lost_after_ms,
    }
}

/// Stops everything this node runs: its executions end with `node_lost`
/// and its sessions' workspaces go (their records were ended, or will be,
/// by the node that declared this one lost).
async fn fence(st: &AppState, why: &str) {
    tracing::error!(node = %st.node.id, why, "this node is fenced: stopping its work");
    st.metrics.node_fenced.inc();
    st.exec.cancel_queued(TerminationReason::NodeLost);
    st.exec.cancel_all(TerminationReason::NodeLost);
    if let Some(sessions) = &st.sessions {
        for id in sessions.ids() {
            drop(sessions.end(&id));
            // Recorded here unless the other node did already.
            let _ = st
                .store
                .end_session(
                    &id,
                    TerminationReason::NodeLost.as_str(),
                    now_ms(),
                    &airlock_store::Actor {
                        actor: format!("node:{}", st.node.id),
                        request_id: None,
                    },
                )
                .await;
        }
    }
}

/// The addresses of the other active nodes: the IP literals of their URLs
/// (a host name is not resolved here; its connections count as a client's).
fn peer_addresses(me: &str, nodes: &[NodeRecord]) -> std::collections::HashSet<std::net::IpAddr> {
    nodes
        .iter()
        .filter(|n| n.id != me && n.state == "active")
        .filter_map(|n| n.url.as_deref()?.parse::<hyper::Uri>().ok())
        .filter_map(|u| {
            u.host()?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
        .collect()
}

/// When this node must have stopped its work, having heard nothing back
/// from the database: before any other node may declare it lost. The
/// others declare it lost once its last heartbeat, stamped by the database
/// when it arrived (so no earlier than it was sent), is `lease` old; this
/// loop looks once per heartbeat, and a heartbeat may take one more to
/// time out: counted from the last successful heartbeat's sending, two
/// heartbeats before the lease ends.
fn fence_after(every: Duration, lease: Duration) -> Duration {
    lease.saturating_sub(every * 2)
}

/// Heartbeats, sweeps lost nodes and fences this one, for as long as the
/// server runs (only on a shared database).
pub(crate) async fn run(st: AppState) {
    let every = Duration::from_millis(st.cfg.node.heartbeat_ms);
    let lease = Duration::from_millis(st.cfg.node.lost_after_ms);
    let deadline = fence_after(every, lease);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the last heartbeat the database took was sent.
    let mut last_ok = Instant::now();
    let mut fenced = false;
    loop {
        tick.tick().await;
        let sent = Instant::now();
        // Bounded: a database that does not answer is a failed heartbeat,
        // not a loop that stops looking at its lease.
        let beat = tokio::time::timeout(every, st.store.node_heartbeat(&st.node.id)).await;
        match beat {
            Ok(Ok(true)) => {
                last_ok = sent;
                fenced = false;
            }
            Ok(Ok(false)) => {
                // Another node declared this one lost (its heartbeats did not
                // arrive in time): its work was failed; stop it here too, then
                // serve again as a node starting.
                fence(&st, "another node declared this node lost").await;
                let again = Instant::now();
                match st.store.register_node(&record(&st.node)).await {
                    Ok(_) => {
                        last_ok = again;
                        fenced = false;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "registering the node again failed");
                        fenced = true;
                    }
                }
                continue;
            }
            failed => {
                match failed {
                    Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                    _ => tracing::warn!(timeout_ms = every.as_millis(), "heartbeat timed out"),
                }
                if !fenced && last_ok.elapsed() >= deadline {
                    fence(
                        &st,
                        "no heartbeat reached the database in time to keep the lease \
                         (node.lost_after_ms)",
                    )
                    .await;
                    fenced = true;
                }
                continue;
            }
        }
        match st.store.list_nodes().await {
            Ok(nodes) => st.peers.set(peer_addresses(&st.node.id, &nodes)),
            Err(e) => tracing::warn!(error = %e, "listing the nodes failed"),
        }
        match st.store.fail_lost_nodes(&st.node.id, now_ms()).await {
            Ok(lost) => {
                for n in lost {
                    st.metrics.nodes_lost.inc();
                    tracing::warn!(
                        node = %n.id,
                        last_heartbeat_at_ms = n.heartbeat_at_ms,
                        executions = n.executions.len(),
                        sessions = n.sessions.len(),
                        "declared a node lost: its executions failed with node_lost"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "sweeping lost nodes failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_id_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_id(d.path()).unwrap();
        assert!(valid_id(&a), "{a}");
        assert_eq!(load_or_create_id(d.path()).unwrap(), a);
        // Not an id: refused, not replaced.
        std::fs::write(d.path().join(ID_FILE), "../../etc\n").unwrap();
        let e = load_or_create_id(d.path()).unwrap_err().to_string();
        assert!(e.contains("does not hold a node id"), "{e}");
        assert_eq!(
            std::fs::read_to_string(d.path().join(ID_FILE)).unwrap(),
            "../../etc\n"
        );
    }

    #[test]
    fn a_node_fences_itself_before_the_others_may_declare_it_lost() {
        let ms = Duration::from_millis;
        // The smallest lease the configuration takes: five heartbeats.
        assert_eq!(fence_after(ms(2000), ms(10_000)), ms(6000));
        assert_eq!(fence_after(ms(2000), ms(15_000)), ms(11_000));
        // Noticed at most one heartbeat late, and a heartbeat that times
        // out takes one more: still within the lease.
        for (every, lease) in [(100, 500), (2000, 15_000), (60_000, 3_600_000)] {
            let (every, lease) = (ms(every), ms(lease));
            assert!(fence_after(every, lease) + every * 2 <= lease);
            assert!(fence_after(every, lease) >= every * 3);
        }
    }

    #[test]
    fn only_other_active_nodes_ip_literals_are_peers() {
        let n = |id: &str, url: Option<&str>, state: &str| NodeRecord {
            id: id.into(),
            name: id.into(),
            url: url.map(String::from),
            pid: 1,
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            state: state.into(),
            lost_after_ms: 15_000,
        };
        let got = peer_addresses(
            "nd_me",
            &[
                n("nd_me", Some("http://10.0.0.1:7070"), "active"),
                n("nd_a", Some("http://10.0.0.2:7070"), "active"),
                n("nd_b", Some("https://[fd00::3]:7443"), "active"),
                n("nd_c", Some("http://10.0.0.4:7070"), "lost"),
                n("nd_d", Some("http://node-d.internal:7070"), "active"),
                n("nd_e", None, "active"),
            ],
        );
        let want: std::collections::HashSet<std::net::IpAddr> =
            ["10.0.0.2".parse().unwrap(), "fd00::3".parse().unwrap()].into();
        assert_eq!(got, want);
    }

    #[test]
    fn the_advertised_url_needs_a_specific_address() {
        let any: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let lo: std::net::SocketAddr = "127.0.0.1:7071".parse().unwrap();
        assert_eq!(advertised_url(None, any, false), None);
        assert_eq!(
            advertised_url(None, lo, true).as_deref(),
            Some("https://127.0.0.1:7071")
        );
        assert_eq!(
            advertised_url(Some("http://n1:7070/"), any, false).as_deref(),
            Some("http://n1:7070")
        );
    }
}
