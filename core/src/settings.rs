//! Per-user settings: JSON values, last-writer-wins by hybrid logical clock, ready for sync.

use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::wire::SettingChange;
use crate::{Change, Tally, ms, write_tx};
use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::{Map, Value};

/// Longest setting key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Largest setting value (serialized JSON), in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid(format!("setting key must be 1 to {MAX_KEY_BYTES} bytes")));
    }
    Ok(())
}

fn encode(key: &str, value: &Value) -> Result<String> {
    let s = serde_json::to_string(value)?;
    if s.len() > MAX_VALUE_BYTES {
        return Err(Error::invalid(format!("value of setting {key:?} is {} bytes; the limit is {MAX_VALUE_BYTES}", s.len())));
    }
    Ok(s)
}

impl Tally {
    /// All settings of a user: the configured defaults overlaid with stored values.
    pub fn settings(&self, user_id: &str) -> Result<Map<String, Value>> {
        let g = self.lock();
        crate::users::get_user(&g.conn, user_id)?;
        let mut out = self.config.default_settings.clone();
        let mut st = g.conn.prepare_cached("SELECT key, value, deleted FROM settings WHERE user_id = ?1")?;
        let rows = st.query_map([user_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, bool>(2)?)))?;
        for row in rows {
            let (k, v, deleted) = row?;
            // A tombstone is "no stored value": the default (if any) shows through again.
            if let (false, Some(v)) = (deleted, v) {
                out.insert(k, serde_json::from_str(&v)?);
            }
        }
        Ok(out)
    }

    /// One setting (`None` when unset and without default).
    pub fn setting(&self, user_id: &str, key: &str) -> Result<Option<Value>> {
        check_key(key)?;
        Ok(self.settings(user_id)?.remove(key))
    }

    /// Sets one setting (`Value::Null` deletes it).
    pub fn set_setting(&self, user_id: &str, key: &str, value: Value) -> Result<()> {
        let mut m = Map::new();
        m.insert(key.to_string(), value);
        self.patch_settings(user_id, m)
    }

    /// Merges `changes` into the settings (`null` deletes a key).
    pub fn patch_settings(&self, user_id: &str, changes: Map<String, Value>) -> Result<()> {
        self.write_settings(user_id, changes, false)
    }

    /// Replaces all settings with `values` (keys not named are deleted).
    pub fn replace_settings(&self, user_id: &str, values: Map<String, Value>) -> Result<()> {
        self.write_settings(user_id, values, true)
    }

    fn write_settings(&self, user_id: &str, changes: Map<String, Value>, replace: bool) -> Result<()> {
        let mut encoded = Vec::with_capacity(changes.len());
        for (k, v) in &changes {
            check_key(k)?;
            encoded.push((k.clone(), if v.is_null() { None } else { Some(encode(k, v)?) }));
        }
        let mut g = self.lock();
        let now = ms(self.observe_now(&mut g)) as u64;
        let node = g.device_id.clone();
        let local_only = &self.config.local_only_settings;
        write_tx(&mut g.conn, |tx| {
            crate::users::get_user(tx, user_id)?;
            if replace {
                let existing: Vec<String> = tx
                    .prepare("SELECT key FROM settings WHERE user_id = ?1 AND deleted = 0")?
                    .query_map([user_id], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for k in existing.into_iter().filter(|k| !changes.contains_key(k)) {
                    encoded.push((k, None));
                }
            }
            for (k, v) in &encoded {
                let last = last_hlc(tx, user_id)?;
                let hlc = Hlc::tick(last.as_ref(), now, &node);
                let dirty = !local_only.contains(k);
                tx.execute(
                    "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted,
                       hlc = excluded.hlc, dirty = excluded.dirty",
                    params![user_id, k, v, v.is_none(), hlc.to_string(), dirty],
                )?;
            }
            Ok(())
        })?;
        drop(g);
        self.notify(user_id, Change { settings: true, ..Change::default() });
        Ok(())
    }

    /// Settings changed locally and not yet sent (local-only keys never appear).
    pub(crate) fn dirty_settings(conn: &rusqlite::Connection, user_id: &str) -> Result<Vec<SettingChange>> {
        let mut st = conn.prepare_cached("SELECT key, value, deleted, hlc FROM settings WHERE user_id = ?1 AND dirty = 1 ORDER BY key")?;
        let rows = st.query_map([user_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, bool>(2)?, r.get::<_, String>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, value, deleted, hlc) = row?;
            let value = value.as_deref().map(serde_json::from_str).transpose()?.unwrap_or(Value::Null);
            out.push(SettingChange { key, value, deleted, hlc });
        }
        Ok(out)
    }

    /// Applies settings received from the server: a change wins when its HLC is greater than
    /// the stored one. Local-only keys are never touched. Returns how many were applied.
    pub(crate) fn merge_settings(tx: &Transaction<'_>, user_id: &str, local_only: &[String], changes: &[SettingChange]) -> Result<usize> {
        let mut applied = 0;
        for c in changes {
            if local_only.contains(&c.key) || check_key(&c.key).is_err() || Hlc::parse(&c.hlc).is_none() {
                continue;
            }
            let value = if c.deleted || c.value.is_null() { None } else { Some(serde_json::to_string(&c.value)?) };
            applied += tx.execute(
                "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty) VALUES (?1, ?2, ?3, ?4, ?5, 0)
                 ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted,
                   hlc = excluded.hlc, dirty = 0 WHERE excluded.hlc > settings.hlc",
                params![user_id, c.key, value, value.is_none(), c.hlc],
            )?;
        }
        Ok(applied)
    }

    /// Marks sent settings clean, unless they changed again since (their HLC moved on).
    pub(crate) fn settings_sent(tx: &Transaction<'_>, user_id: &str, sent: &[SettingChange]) -> Result<()> {
        for c in sent {
            tx.execute("UPDATE settings SET dirty = 0 WHERE user_id = ?1 AND key = ?2 AND hlc = ?3", params![user_id, c.key, c.hlc])?;
        }
        Ok(())
    }
}

fn last_hlc(tx: &Transaction<'_>, user_id: &str) -> Result<Option<Hlc>> {
    // The clock must pass every HLC this user has seen, not only this key's.
    let max: Option<String> =
        tx.query_row("SELECT MAX(hlc) FROM settings WHERE user_id = ?1", [user_id], |r| r.get(0)).optional()?.flatten();
    Ok(max.as_deref().and_then(Hlc::parse))
}
