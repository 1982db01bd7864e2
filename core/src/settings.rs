//! Per-user settings: JSON values, last-writer-wins by hybrid logical clock, ready for sync.

use crate::error::Result;
use crate::hlc::Hlc;
use crate::wire::SettingChange;
use crate::{Change, Tally, contract, ms, write_tx};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

/// Where one setting stands with the server (see [`Tally::setting_status`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum SettingStatus {
    /// No value is stored for the key (a configured default may still show through).
    NotSet,
    /// The key is declared local-only: it never leaves the device.
    LocalOnly,
    /// The last write (a delete included) has not reached the server yet.
    Pending,
    /// The stored value is the one the server has.
    Synced,
    /// The last write was refused (by the server, or by the contract before it was sent) and is
    /// kept here but never resent until the app writes the key again. The reason is a contract
    /// code: `value_too_large`, `invalid_setting`, `invalid_text`, `quota_exceeded`, `too_large`.
    Rejected {
        /// Why.
        reason: String,
    },
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
        contract::setting_key(key)?;
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
            contract::setting_key(k)?;
            encoded.push((k.clone(), if v.is_null() { None } else { Some(contract::setting_value(k, v)?) }));
        }
        let mut g = self.lock();
        let now = ms(self.observe_now(&mut g)) as u64;
        let node = g.device_id.clone();
        let local_only = &self.config.local_only_settings;
        write_tx(&mut g.conn, |tx| {
            crate::users::get_user(tx, user_id)?;
            // The user's stored settings as they will be after this write, against the caps.
            let mut view: HashMap<String, usize> = HashMap::new();
            {
                let mut st = tx.prepare("SELECT key, value FROM settings WHERE user_id = ?1 AND deleted = 0")?;
                let rows = st.query_map([user_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))?;
                for row in rows {
                    let (k, v) = row?;
                    let size = contract::setting_bytes(&k, v.as_deref().unwrap_or(""));
                    view.insert(k, size);
                }
            }
            if replace {
                let mut stale: Vec<String> = view.keys().filter(|k| !changes.contains_key(*k)).cloned().collect();
                stale.sort();
                encoded.extend(stale.into_iter().map(|k| (k, None)));
            }
            let (keys_before, bytes_before) = (view.len(), view.values().sum::<usize>());
            for (k, v) in &encoded {
                match v {
                    Some(v) => view.insert(k.clone(), contract::setting_bytes(k, v)),
                    None => view.remove(k),
                };
            }
            // A write that grows the stored settings must fit the caps; one that shrinks them
            // (a delete) is always allowed, even when older data is already over.
            let (keys, bytes) = (view.len(), view.values().sum::<usize>());
            if keys > keys_before || bytes > bytes_before {
                contract::settings_quota(keys, bytes)?;
            }
            for (k, v) in &encoded {
                let last = last_hlc(tx, user_id)?;
                let hlc = Hlc::tick(last.as_ref(), now, &node);
                let dirty = !local_only.contains(k);
                // A new write clears an earlier rejection: it is sent again.
                tx.execute(
                    "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty, rejected) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)
                     ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted,
                       hlc = excluded.hlc, dirty = excluded.dirty, rejected = NULL",
                    params![user_id, k, v, v.is_none(), hlc.to_string(), dirty],
                )?;
            }
            Ok(())
        })?;
        drop(g);
        self.notify(user_id, Change { settings: true, ..Change::default() });
        Ok(())
    }

    /// Where `key` of `user_id` stands with the server: [`SettingStatus::NotSet`] when nothing is
    /// stored for it, [`SettingStatus::LocalOnly`] for a local-only key, otherwise
    /// [`SettingStatus::Rejected`] (with the reason), [`SettingStatus::Pending`] or
    /// [`SettingStatus::Synced`]. An unknown user is [`crate::Error::NotFound`]; an invalid key
    /// is [`crate::Error::InvalidInput`].
    pub fn setting_status(&self, user_id: &str, key: &str) -> Result<SettingStatus> {
        contract::setting_key(key)?;
        let g = self.lock();
        crate::users::get_user(&g.conn, user_id)?;
        let row: Option<(bool, Option<String>)> = g
            .conn
            .prepare_cached("SELECT dirty, rejected FROM settings WHERE user_id = ?1 AND key = ?2")?
            .query_row(params![user_id, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            None => SettingStatus::NotSet,
            Some(_) if self.config.local_only_settings.iter().any(|k| k == key) => SettingStatus::LocalOnly,
            Some((_, Some(reason))) => SettingStatus::Rejected { reason },
            Some((true, None)) => SettingStatus::Pending,
            Some((false, None)) => SettingStatus::Synced,
        })
    }

    /// Settings changed locally and not yet sent, in key order (local-only keys never appear).
    /// A stored row that cannot be sent as it is (a value that no longer parses, written by an
    /// older version) comes back as `Err((key, code))` for the caller to quarantine.
    pub(crate) fn dirty_settings(
        conn: &Connection,
        user_id: &str,
    ) -> Result<Vec<std::result::Result<SettingChange, (String, &'static str)>>> {
        let mut st = conn.prepare_cached("SELECT key, value, deleted, hlc FROM settings WHERE user_id = ?1 AND dirty = 1 ORDER BY key")?;
        let rows = st.query_map([user_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, bool>(2)?, r.get::<_, String>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, value, deleted, hlc) = row?;
            let value = match value.as_deref().map(serde_json::from_str::<Value>).transpose() {
                Ok(v) => v.unwrap_or(Value::Null),
                Err(_) => {
                    out.push(Err((key, "invalid_setting")));
                    continue;
                }
            };
            out.push(Ok(SettingChange { key, value, deleted, hlc }));
        }
        Ok(out)
    }

    /// Applies settings received from the server. The server's re-stamp of a write this
    /// request sent (`sent`: key → the HLC sent) — same node, same value, the row unchanged
    /// since — is adopted even though its HLC may be lower than ours (the server re-stamps one
    /// too far ahead of its clock). Every other change wins only when its HLC is greater than
    /// the stored one. Local-only keys are never touched. Returns how many were applied.
    pub(crate) fn merge_settings(
        tx: &Connection,
        user_id: &str,
        local_only: &[String],
        changes: &[SettingChange],
        sent: &BTreeMap<String, String>,
    ) -> Result<usize> {
        let mut applied = 0;
        for c in changes {
            if local_only.contains(&c.key) || contract::setting_key(&c.key).is_err() || Hlc::parse(&c.hlc).is_none() {
                continue;
            }
            let value = if c.deleted || c.value.is_null() { None } else { Some(serde_json::to_string(&c.value)?) };
            if let Some(sent_hlc) = sent.get(&c.key)
                && restamps(tx, user_id, sent_hlc, c)?
            {
                tx.execute(
                    "UPDATE settings SET hlc = ?3, dirty = 0, rejected = NULL WHERE user_id = ?1 AND key = ?2 AND hlc = ?4",
                    params![user_id, c.key, c.hlc, sent_hlc],
                )?;
                applied += usize::from(sent_hlc != &c.hlc);
                continue;
            }
            applied += tx.execute(
                "INSERT INTO settings (user_id, key, value, deleted, hlc, dirty) VALUES (?1, ?2, ?3, ?4, ?5, 0)
                 ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, deleted = excluded.deleted,
                   hlc = excluded.hlc, dirty = 0, rejected = NULL WHERE excluded.hlc > settings.hlc",
                params![user_id, c.key, value, value.is_none(), c.hlc],
            )?;
        }
        Ok(applied)
    }

    /// Marks sent settings clean, unless they changed again since (their HLC moved on).
    pub(crate) fn settings_sent(tx: &Connection, user_id: &str, sent: &[SettingChange]) -> Result<()> {
        for c in sent {
            tx.execute("UPDATE settings SET dirty = 0 WHERE user_id = ?1 AND key = ?2 AND hlc = ?3", params![user_id, c.key, c.hlc])?;
        }
        Ok(())
    }

    /// Quarantines one setting: `reason` kept, dirty cleared, never resent until the app writes
    /// the key again. `hlc`: only when the row still has this HLC (unchanged since it was sent).
    pub(crate) fn reject_setting(tx: &Connection, user_id: &str, key: &str, hlc: Option<&str>, reason: &str) -> Result<bool> {
        let n = tx.execute(
            "UPDATE settings SET rejected = ?3, dirty = 0 WHERE user_id = ?1 AND key = ?2 AND (?4 IS NULL OR hlc = ?4)",
            params![user_id, key, reason, hlc],
        )?;
        Ok(n > 0)
    }
}

/// Whether `c` is the server's (re-stamped) copy of the write this device sent with `sent_hlc`:
/// the same node wrote it, it carries the same value (or the same delete), and the stored row
/// still has `sent_hlc` (it has not changed since it was sent).
fn restamps(tx: &Connection, user_id: &str, sent_hlc: &str, c: &SettingChange) -> Result<bool> {
    let (Some(sent), Some(got)) = (Hlc::parse(sent_hlc), Hlc::parse(&c.hlc)) else { return Ok(false) };
    if sent.node != got.node {
        return Ok(false);
    }
    let row: Option<(Option<String>, bool)> = tx
        .prepare_cached("SELECT value, deleted FROM settings WHERE user_id = ?1 AND key = ?2 AND hlc = ?3")?
        .query_row(params![user_id, c.key, sent_hlc], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((value, deleted)) = row else { return Ok(false) };
    let deleted_there = c.deleted || c.value.is_null();
    Ok(match (deleted || value.is_none(), deleted_there) {
        (true, true) => true,
        (false, false) => value.as_deref().map(serde_json::from_str::<Value>).transpose()?.as_ref() == Some(&c.value),
        _ => false,
    })
}

fn last_hlc(tx: &Connection, user_id: &str) -> Result<Option<Hlc>> {
    // The clock must pass every HLC this user has seen, not only this key's.
    let max: Option<String> =
        tx.query_row("SELECT MAX(hlc) FROM settings WHERE user_id = ?1", [user_id], |r| r.get(0)).optional()?.flatten();
    Ok(max.as_deref().and_then(Hlc::parse))
}
