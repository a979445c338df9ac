//! Devices in Redis: atomic per-device changes (one Lua script each), and reading records
//! back. Every change bumps `ver` and publishes what changed, in the same script.

use std::collections::BTreeMap;

use redis::Script;

use super::{Cluster, ClusterError};
use crate::store::{CredentialRecord, DeviceRecord};

/// One change to one device.
#[derive(Debug)]
pub enum Change<'a> {
    SetLabels(&'a BTreeMap<String, String>),
    /// Disabling also revokes (bumps the generation) if the device was enabled.
    SetEnabled(bool),
    Revoke,
    /// Refused if the kid exists or the device already holds `max` credentials.
    AddCredential {
        record: &'a CredentialRecord,
        max: usize,
    },
    RemoveCredential(&'a str),
    Delete,
}

/// What a change did.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; the device as it is now (`None` once deleted).
    Done(Option<DeviceRecord>),
    NotFound,
    CredentialExists,
    TooManyCredentials,
    CredentialNotFound,
}

/// KEYS: dev key, devs set, ver. ARGV: channel, id, op, args…
/// Returns `{status, record fields…}`: status 1 = done, -1 no device, -2 kid exists,
/// -3 too many credentials, -4 no such kid.
const CHANGE: &str = r#"
local k, id, op = KEYS[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', k) == 0 then return {-1} end
if op == 'labels' then
  redis.call('HSET', k, 'labels', ARGV[4])
elseif op == 'enabled' then
  if ARGV[4] == '0' and redis.call('HGET', k, 'enabled') == '1' then
    redis.call('HINCRBY', k, 'gen', 1)
  end
  redis.call('HSET', k, 'enabled', ARGV[4])
elseif op == 'revoke' then
  redis.call('HINCRBY', k, 'gen', 1)
elseif op == 'cred_add' then
  local f = 'c:' .. ARGV[4]
  if redis.call('HEXISTS', k, f) == 1 then return {-2} end
  local n = 0
  for _, name in ipairs(redis.call('HKEYS', k)) do
    if string.sub(name, 1, 2) == 'c:' then n = n + 1 end
  end
  if n >= tonumber(ARGV[6]) then return {-3} end
  redis.call('HSET', k, f, ARGV[5])
elseif op == 'cred_del' then
  if redis.call('HDEL', k, 'c:' .. ARGV[4]) == 0 then return {-4} end
elseif op == 'delete' then
  redis.call('DEL', k)
  redis.call('SREM', KEYS[2], id)
else
  return redis.error_reply('unknown op ' .. op)
end
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[1], v .. ' dev ' .. id)
local out = {1}
for _, x in ipairs(redis.call('HGETALL', k)) do table.insert(out, x) end
return out
"#;

/// Creates the devices that do not exist yet. KEYS: devs set, ver. ARGV: registry prefix
/// (`{p}`), channel, then (id, labels JSON, created_at, first generation) rows. The device keys are built in the
/// script from the registry prefix: one script for up to 10 000 devices, and on Redis Cluster
/// they share the hash slot of KEYS (the prefix's hash tag). Returns the ids created.
const CREATE: &str = r#"
local p = ARGV[1]
local created = {}
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  local k = p .. ':dev:' .. id
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'created_at', ARGV[i + 2], 'enabled', '1', 'gen', ARGV[i + 3], 'labels', ARGV[i + 1])
    redis.call('SADD', KEYS[1], id)
    table.insert(created, id)
  end
end
if #created > 0 then
  local v = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[2], v .. ' devs ' .. table.concat(created, '\n'))
end
return created
"#;

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

impl Cluster {
    fn device_key(&self, id: &str) -> String {
        self.registry_key(&format!("dev:{id}"))
    }

    /// Registers the devices (new records, no credentials) that do not exist yet; returns the
    /// ids created.
    pub async fn create_devices(
        &self,
        devices: &[crate::store::DeviceRecord],
    ) -> Result<Vec<String>, ClusterError> {
        let script = Script::new(CREATE);
        let mut inv = script.prepare_invoke();
        inv.key(self.registry_key("devs"))
            .key(self.registry_key("ver"))
            .arg(self.registry_prefix())
            .arg(self.registry_key("changes"));
        for d in devices {
            inv.arg(&d.device_id)
                .arg(labels_json(&d.labels))
                .arg(d.created_at)
                .arg(d.generation);
        }
        self.script(&inv).await
    }

    /// Applies one change atomically and returns the device as it is after it.
    pub async fn change_device(
        &self,
        id: &str,
        change: Change<'_>,
    ) -> Result<Outcome, ClusterError> {
        let script = Script::new(CHANGE);
        let mut inv = script.prepare_invoke();
        inv.key(self.device_key(id))
            .key(self.registry_key("devs"))
            .key(self.registry_key("ver"))
            .arg(self.registry_key("changes"))
            .arg(id);
        match change {
            Change::SetLabels(l) => inv.arg("labels").arg(labels_json(l)),
            Change::SetEnabled(e) => inv.arg("enabled").arg(if e { "1" } else { "0" }),
            Change::Revoke => inv.arg("revoke"),
            Change::AddCredential { record, max } => inv
                .arg("cred_add")
                .arg(record.kid())
                .arg(
                    serde_json::to_string(record)
                        .map_err(|e| ClusterError::Corrupt(e.to_string()))?,
                )
                .arg(max),
            Change::RemoveCredential(kid) => inv.arg("cred_del").arg(kid),
            Change::Delete => inv.arg("delete"),
        };
        let reply: Vec<redis::Value> = self.script(&inv).await?;
        let status = match reply.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => return Err(ClusterError::Corrupt("device script reply".into())),
        };
        Ok(match status {
            1 => Outcome::Done(parse_fields(id, &reply[1..])?),
            -1 => Outcome::NotFound,
            -2 => Outcome::CredentialExists,
            -3 => Outcome::TooManyCredentials,
            -4 => Outcome::CredentialNotFound,
            n => return Err(ClusterError::Corrupt(format!("device script status {n}"))),
        })
    }

    /// One device as stored (`None`: it does not exist).
    pub async fn load_device(&self, id: &str) -> Result<Option<DeviceRecord>, ClusterError> {
        let fields: Vec<redis::Value> = self
            .run(redis::cmd("HGETALL").arg(self.device_key(id)))
            .await?;
        parse_fields(id, &fields)
    }

    /// Every device, in batches of `batch` (a full reload).
    pub async fn load_all_devices(&self) -> Result<Vec<DeviceRecord>, ClusterError> {
        let ids: Vec<String> = self
            .run(redis::cmd("SMEMBERS").arg(self.registry_key("devs")))
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let cmds = chunk
                .iter()
                .map(|id| {
                    let mut c = redis::cmd("HGETALL");
                    c.arg(self.device_key(id));
                    c
                })
                .collect();
            let rows: Vec<Vec<redis::Value>> = self.batch(cmds, self.settings.timeout * 4).await?;
            for (id, fields) in chunk.iter().zip(rows) {
                if let Some(rec) = parse_fields(id, &fields)? {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }
}

/// A device hash (flat field/value list) as a record; empty = the device does not exist.
fn parse_fields(id: &str, fields: &[redis::Value]) -> Result<Option<DeviceRecord>, ClusterError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let corrupt = |what: &str| ClusterError::Corrupt(format!("device {id}: {what}"));
    let text = |v: &redis::Value| -> Result<String, ClusterError> {
        match v {
            redis::Value::BulkString(b) => {
                String::from_utf8(b.clone()).map_err(|_| corrupt("utf-8"))
            }
            redis::Value::SimpleString(s) => Ok(s.clone()),
            redis::Value::Int(n) => Ok(n.to_string()),
            _ => Err(corrupt("field type")),
        }
    };
    let mut rec = DeviceRecord {
        device_id: id.to_owned(),
        labels: BTreeMap::new(),
        enabled: true,
        generation: 0,
        created_at: 0,
        credentials: Vec::new(),
    };
    for pair in fields.chunks(2) {
        let [name, value] = pair else {
            return Err(corrupt("odd field list"));
        };
        let (name, value) = (text(name)?, text(value)?);
        match name.as_str() {
            "created_at" => rec.created_at = value.parse().map_err(|_| corrupt("created_at"))?,
            "enabled" => rec.enabled = value == "1",
            "gen" => rec.generation = value.parse().map_err(|_| corrupt("gen"))?,
            "labels" => rec.labels = serde_json::from_str(&value).map_err(|_| corrupt("labels"))?,
            n if n.starts_with("c:") => rec
                .credentials
                .push(serde_json::from_str(&value).map_err(|_| corrupt("credential"))?),
            _ => {}
        }
    }
    // Hash order is arbitrary: list credentials in the order they were added.
    rec.credentials
        .sort_by(|a, b| (created(a), a.kid()).cmp(&(created(b), b.kid())));
    Ok(Some(rec))
}

fn created(r: &CredentialRecord) -> u64 {
    match r {
        CredentialRecord::PublicKey { created_at, .. }
        | CredentialRecord::Secret { created_at, .. } => *created_at,
    }
}
