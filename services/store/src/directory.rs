//! The user directory, serving regions and push devices.

use std::collections::HashMap;

use meridian_model::{RegionId, UserId};

use crate::apply::inbox_epoch;
use crate::keys::Keys;
use crate::kv::prefix_end;
use crate::records::{decode, DeviceRecord, RegionRecord, UserRecord};
use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    pub user_id: UserId,
    pub home_region: RegionId,
    pub display_name: String,
    /// The region serving the user now: its home, or the acting region after a failover.
    pub serving_region: RegionId,
    /// The epoch the user's inbox has in the serving region.
    pub epoch: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub device_id: String,
    pub platform: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionServing {
    pub region: RegionId,
    pub serving: RegionId,
    pub epoch: String,
    /// While another region serves them: how far that region had applied each stream
    /// (stream name, seq) when it took over (the failback precondition); empty otherwise.
    pub failover_point: Vec<(String, u64)>,
}

impl Store {
    pub async fn user(&self, user: &UserId) -> Result<Option<UserView>> {
        // Every authenticated call and WebSocket frame asks this: two latest-value reads
        // (the embedded backend serves them from its read cache) rather than a snapshot.
        let key = self.keys().user(user);
        let Some(bytes) = self
            .kv()
            .get_latest(std::slice::from_ref(&key))
            .await?
            .pop()
            .flatten()
        else {
            return Ok(None);
        };
        let rec: UserRecord = decode(&key, &bytes)?;
        let Some(home) = rec.home_region else {
            return Ok(None);
        };
        let home = RegionId::parse(home.value)?;
        let rkey = self.keys().region(&home);
        let found = self
            .kv()
            .get_latest(std::slice::from_ref(&rkey))
            .await?
            .pop()
            .flatten();
        let serving = region_serving_from(&rkey, found.as_deref(), &home)?;
        Ok(Some(UserView {
            user_id: user.clone(),
            home_region: home,
            display_name: rec.display_name.map(|d| d.value).unwrap_or_default(),
            serving_region: serving.serving,
            epoch: serving.epoch,
        }))
    }

    /// Who serves the users homed in `region`, and their inbox epoch.
    pub async fn region_serving(&self, region: &RegionId) -> Result<RegionServing> {
        let mut txn = self.kv().begin_read().await?;
        self.region_serving_in(txn.as_mut(), region).await
    }

    pub(crate) async fn region_serving_in(
        &self,
        txn: &mut dyn crate::KvTxn,
        region: &RegionId,
    ) -> Result<RegionServing> {
        region_serving_in(txn, self.keys(), region).await
    }

    /// The active push devices of a user.
    pub async fn devices(&self, user: &UserId) -> Result<Vec<DeviceView>> {
        let prefix = self.keys().devices_prefix(user);
        let mut txn = self.kv().begin_read().await?;
        let rows = Store::scan_all(txn.as_mut(), &prefix, &prefix_end(&prefix)).await?;
        let mut out = Vec::new();
        for (k, v) in rows {
            let rec: DeviceRecord = decode(&k, &v)?;
            if rec.active {
                out.push(DeviceView {
                    device_id: String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                    platform: rec.platform,
                    token: rec.token,
                });
            }
        }
        Ok(out)
    }
}

/// Who serves the users homed in `region`, read through `txn`.
async fn region_serving_in(
    txn: &mut dyn crate::KvTxn,
    keys: &Keys,
    region: &RegionId,
) -> Result<RegionServing> {
    let key = keys.region(region);
    let found = txn.get(&key).await?;
    region_serving_from(&key, found.as_deref(), region)
}

/// [`RegionServing`] from the region record's bytes (`None`: no record, the region serves
/// its own users).
fn region_serving_from(key: &[u8], found: Option<&[u8]>, region: &RegionId) -> Result<RegionServing> {
    let rec: RegionRecord = match found {
        Some(b) => decode(key, b)?,
        None => RegionRecord::default(),
    };
    let (serving, version) = match rec.serving {
        Some(s) if !s.value.is_empty() => (RegionId::parse(s.value)?, s.version),
        Some(s) => (region.clone(), s.version),
        None => (region.clone(), Vec::new()),
    };
    let failover_point = if serving == *region {
        Vec::new()
    } else {
        rec.failover_point
            .into_iter()
            .map(|p| (p.stream, p.seq))
            .collect()
    };
    Ok(RegionServing {
        region: region.clone(),
        epoch: inbox_epoch(&serving, &version),
        serving,
        failover_point,
    })
}

/// For each user, their inbox epoch if `region` serves them, else `None`, read through
/// `txn`: the one rule for "who fans out to this inbox", used by the applier's fan-out and
/// read diffusion's trailing-edge flush alike.
pub(crate) async fn served_epochs_in(
    txn: &mut dyn crate::KvTxn,
    keys: &Keys,
    region: &RegionId,
    users: &[UserId],
) -> Result<Vec<Option<String>>> {
    let user_keys: Vec<Vec<u8>> = users.iter().map(|u| keys.user(u)).collect();
    let found = txn.batch_get(&user_keys).await?;
    let mut by_home: HashMap<String, Option<String>> = HashMap::new();
    let mut out = Vec::with_capacity(users.len());
    for (k, v) in user_keys.iter().zip(found) {
        let home = match v {
            Some(v) => decode::<UserRecord>(k, &v)?.home_region.map(|r| r.value),
            None => None,
        };
        let Some(home) = home else {
            out.push(None);
            continue;
        };
        if !by_home.contains_key(&home) {
            let serving = region_serving_in(txn, keys, &RegionId::parse(home.as_str())?).await?;
            by_home.insert(
                home.clone(),
                (serving.serving == *region).then_some(serving.epoch),
            );
        }
        out.push(by_home[&home].clone());
    }
    Ok(out)
}
