//! `airlock run` with `network.mode = "proxy"`: the same per-execution
//! egress proxy the server uses, run in-process on its own thread.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// The proxy of one `airlock run`, and what it decided.
pub struct LocalProxy {
    events: Arc<Mutex<Vec<airlock_egress::EgressEvent>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LocalProxy {
    /// Serves `channel` for `rules`. DNS: `AIRLOCK_EGRESS_DNS` (`ip:port`)
    /// or the host's resolv.conf. Each decision is also printed to stderr
    /// unless `quiet`.
    pub fn start(
        channel: OwnedFd,
        rules: Vec<airlock_policy::egress::EgressRule>,
        quiet: bool,
    ) -> Result<LocalProxy, String> {
        let dns = match std::env::var("AIRLOCK_EGRESS_DNS") {
            Ok(v) => airlock_egress::Dns::Nameserver(
                v.parse()
                    .map_err(|_| format!("AIRLOCK_EGRESS_DNS {v:?} is not ip:port"))?,
            ),
            Err(_) => airlock_egress::Dns::System,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the egress proxy: {e}"))?;
        let resolver = {
            let _g = rt.enter();
            airlock_egress::resolver(&dns).map_err(|e| format!("no DNS resolver: {e}"))?
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = events.clone();
        let sink: airlock_egress::Sink = Arc::new(move |ev: airlock_egress::EgressEvent| {
            if !quiet {
                match &ev.reason {
                    Some(why) => eprintln!("airlock: egress denied {}:{}: {why}", ev.host, ev.port),
                    None => eprintln!(
                        "airlock: egress allowed {}:{} ({} bytes up, {} down)",
                        ev.host, ev.port, ev.bytes_up, ev.bytes_down
                    ),
                }
            }
            log.lock().unwrap_or_else(|p| p.into_inner()).push(ev);
        });
        let proxy = airlock_egress::Proxy::new(rules, Arc::new(resolver), sink);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("airlock-egress".into())
            .spawn(move || rt.block_on(proxy.serve_channel(channel, stopped)))
            .map_err(|e| format!("cannot start the egress proxy: {e}"))?;
        Ok(LocalProxy {
            events,
            thread: Some(thread),
            stop: Some(stop),
        })
    }

    /// Waits for the proxy (the sandbox is gone, so its channel is closed;
    /// connections still open get 2 s, then are cut) and returns every
    /// decision.
    pub fn finish(mut self) -> Vec<airlock_egress::EgressEvent> {
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let _ = t.join();
        }
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
