//! Admin-created quota rules in Redis (`rules` hash: benefit id → rule JSON). Rules synced
//! from the upstream are not stored here: every node pulls them itself.

use policy::quota::Rule;
use redis::Script;

use super::{Cluster, ClusterError};

/// KEYS: rules hash, ver. ARGV: channel, benefit id, rule JSON. The message names the rule,
/// so nodes re-read that one rule, not the whole hash.
const PUT: &str = r#"
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[1], v .. ' rule ' .. ARGV[2])
return v
"#;

impl Cluster {
    /// Stores (creates or replaces) one rule and tells every node.
    pub async fn put_rule(&self, rule: &Rule) -> Result<(), ClusterError> {
        let json = serde_json::to_string(rule).map_err(|e| ClusterError::Corrupt(e.to_string()))?;
        let script = Script::new(PUT);
        let mut inv = script.prepare_invoke();
        inv.key(self.registry_key("rules"))
            .key(self.registry_key("ver"))
            .arg(self.registry_key("changes"))
            .arg(&rule.benefit_id)
            .arg(json);
        let _: u64 = self.script(&inv).await?;
        Ok(())
    }

    /// One stored rule, if Redis has it.
    pub async fn load_rule(&self, benefit_id: &str) -> Result<Option<Rule>, ClusterError> {
        let json: Option<String> = self
            .run(
                redis::cmd("HGET")
                    .arg(self.registry_key("rules"))
                    .arg(benefit_id),
            )
            .await?;
        json.map(|j| decode(benefit_id, &j)).transpose()
    }

    /// Every stored rule.
    pub async fn load_rules(&self) -> Result<Vec<Rule>, ClusterError> {
        let rows: Vec<(String, String)> = self
            .run(redis::cmd("HGETALL").arg(self.registry_key("rules")))
            .await?;
        rows.into_iter()
            .map(|(id, json)| decode(&id, &json))
            .collect()
    }
}

/// A stored rule's JSON.
fn decode(benefit_id: &str, json: &str) -> Result<Rule, ClusterError> {
    serde_json::from_str(json).map_err(|e| ClusterError::Corrupt(format!("rule {benefit_id}: {e}")))
}
