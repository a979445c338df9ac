//! The change feed: keeps this node's device registry and rule set equal to Redis.
//!
//! Pub/sub delivers `"<ver> <what>"` for every change; the node applies it by re-reading what
//! changed (so a message is idempotent and carries no data that could go stale). Versions
//! are consecutive: a gap means a lost message and triggers a full reload, as does every
//! (re)subscription. Every `full_check_interval` the node compares Redis's `ver` with the
//! version it has applied; one still behind at the next check (not just in flight) is
//! reloaded in full too.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{Cluster, ClusterError};
use crate::state::SharedState;

/// Background service running the feed.
pub struct Feed {
    pub state: SharedState,
    pub cluster: Arc<Cluster>,
}

/// What one message asks for.
#[derive(Debug, PartialEq, Eq)]
enum Message<'a> {
    Device(&'a str),
    Devices(Vec<&'a str>),
    /// One rule changed (its benefit id).
    Rule(&'a str),
    /// Reload every rule (what nodes before `rule <id>` messages published).
    Rules,
}

fn parse(payload: &str) -> Option<(u64, Message<'_>)> {
    let (ver, rest) = payload.split_once(' ')?;
    let ver = ver.parse().ok()?;
    let (what, arg) = rest.split_once(' ').unwrap_or((rest, ""));
    let msg = match what {
        "dev" => Message::Device(arg),
        "devs" => Message::Devices(arg.split('\n').filter(|s| !s.is_empty()).collect()),
        "rule" if !arg.is_empty() => Message::Rule(arg),
        "rules" => Message::Rules,
        _ => return None,
    };
    Some((ver, msg))
}

impl Feed {
    /// Re-reads one device and applies it (or its absence).
    async fn apply_device(&self, id: &str) -> Result<(), ClusterError> {
        let rec = self.cluster.load_device(id).await?;
        let state = &self.state;
        match rec {
            Some(r) => state.devices.upsert(r),
            None => {
                if let Ok(id) = policy::ids::DeviceId::parse(id) {
                    state.devices.remove(&id);
                    state.quotas.forget_device(&id);
                }
            }
        }
        state.metrics.devices.set(state.devices.len() as i64);
        Ok(())
    }

    /// Redis's change counter (0 before the first change).
    async fn current_ver(&self) -> Result<u64, ClusterError> {
        let ver: Option<u64> = self
            .cluster
            .run(redis::cmd("GET").arg(self.cluster.registry_key("ver")))
            .await?;
        Ok(ver.unwrap_or(0))
    }

    /// Loads everything; returns the version it is at least as new as.
    async fn full_reload(&self) -> Result<u64, ClusterError> {
        let ver = self.current_ver().await?;
        let records = self.cluster.load_all_devices().await?;
        let n = records.len();
        self.state.devices.replace_all(records);
        self.state
            .metrics
            .devices
            .set(self.state.devices.len() as i64);
        self.reload_rules().await?;
        tracing::info!(devices = n, "Cluster state reloaded from Redis.");
        Ok(ver)
    }

    async fn reload_rules(&self) -> Result<(), ClusterError> {
        let rules = self.cluster.load_rules().await?;
        if let Err(e) = self.state.quotas.replace_local_rules(rules) {
            tracing::error!(error = %e, "Rules in Redis are inconsistent; keeping the current set.");
        }
        Ok(())
    }

    /// Re-reads one rule and derives the next set with it (a shard copy, not a rebuild). A
    /// rule Redis does not have, or one that does not fit the current set, falls back to a
    /// full reload of the rules.
    async fn apply_rule(&self, benefit_id: &str) -> Result<(), ClusterError> {
        let Some(rule) = self.cluster.load_rule(benefit_id).await? else {
            tracing::warn!(
                benefit_id,
                "A changed rule is not in Redis; reloading every rule."
            );
            return self.reload_rules().await;
        };
        if let Err(e) = self.state.quotas.apply_rule(&rule) {
            tracing::warn!(error = %e, benefit_id, "A changed rule does not fit this node's set; reloading every rule.");
            return self.reload_rules().await;
        }
        Ok(())
    }

    async fn handle(&self, payload: &str, applied: &mut u64) -> Result<(), ClusterError> {
        let Some((ver, msg)) = parse(payload) else {
            tracing::warn!("Ignoring an unreadable cluster change message.");
            return Ok(());
        };
        if ver <= *applied {
            return Ok(());
        }
        if ver > *applied + 1 {
            tracing::warn!(
                applied = *applied,
                got = ver,
                "Missed cluster changes; reloading."
            );
            *applied = self.full_reload().await?.max(ver);
            return Ok(());
        }
        match msg {
            Message::Device(id) => self.apply_device(id).await?,
            Message::Devices(ids) => {
                for id in ids {
                    self.apply_device(id).await?;
                }
            }
            Message::Rule(id) => self.apply_rule(id).await?,
            Message::Rules => self.reload_rules().await?,
        }
        *applied = ver;
        Ok(())
    }

    /// One subscription's life: subscribe, reload, then follow messages and checks until the
    /// connection breaks.
    async fn follow(
        &self,
        applied: &mut u64,
        shutdown: &mut pingora::server::ShutdownWatch,
    ) -> Result<bool, ClusterError> {
        let mut ps = self.cluster.pubsub().await?;
        ps.subscribe(self.cluster.registry_key("changes")).await?;
        // Subscribed first, then reloaded: nothing between the two is missed.
        *applied = (*applied).max(self.full_reload().await?);
        let mut stream = ps.into_on_message();
        let mut check = tokio::time::interval(self.cluster.settings.full_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut behind_since_last_check = false;
        loop {
            tokio::select! {
                m = stream.next() => {
                    let Some(m) = m else {
                        return Err(ClusterError::Unavailable("pub/sub connection closed".into()));
                    };
                    let payload: String = m.get_payload().unwrap_or_default();
                    self.handle(&payload, applied).await?;
                }
                _ = check.tick() => {
                    let ver = self.current_ver().await?;
                    let behind = ver > *applied;
                    if behind && behind_since_last_check {
                        tracing::warn!(applied = *applied, "Cluster changes not delivered; reloading.");
                        *applied = (*applied).max(self.full_reload().await?);
                        behind_since_last_check = false;
                    } else {
                        behind_since_last_check = behind;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return Ok(true);
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Feed {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut applied = 0u64;
        loop {
            match self.follow(&mut applied, &mut shutdown).await {
                Ok(_) => return,
                Err(e) => {
                    self.cluster.count_error("feed");
                    tracing::warn!(error = %e, "Cluster change feed interrupted; resubscribing.");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert_eq!(parse("7 dev a-1"), Some((7, Message::Device("a-1"))));
        assert_eq!(
            parse("8 devs a\nb"),
            Some((8, Message::Devices(vec!["a", "b"])))
        );
        assert_eq!(parse("9 rules"), Some((9, Message::Rules)));
        assert_eq!(
            parse("10 rule 7400000000000000001"),
            Some((10, Message::Rule("7400000000000000001")))
        );
        assert_eq!(parse("11 rule "), None);
        assert_eq!(parse("11 rule"), None);
        assert_eq!(parse("x dev a"), None);
        assert_eq!(parse("9 what"), None);
        assert_eq!(parse(""), None);
    }
}
