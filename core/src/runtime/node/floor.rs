//! What a node keeps across restarts besides its data: its clock floor and its generation.
//!
//! Versions must never be reissued, even after a restart with a clock that went back. So a
//! node with persistent storage reserves a window of timestamps ahead of its clock in the
//! storage's metadata ([`FLOOR_LEASE`] at a time) before it issues or accepts a version past
//! the current reservation, and on restart its clock starts above the stored reservation. A
//! write costs one atomic comparison; the metadata write happens about once per lease.

use tokio::sync::Mutex;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::hlc::{Hlc, Timestamp, WallClock};
use crate::membership::message::MAX_GENERATION;
use crate::storage::{SharedStorage, Storage, StorageError};

/// The metadata name of the clock floor.
pub(crate) const FLOOR_META: &str = "node.hlc-floor";
/// The metadata name of the last generation.
pub(crate) const GENERATION_META: &str = "node.generation";
/// How far ahead of the clock each reservation reaches. A restarted node's clock starts at the
/// stored reservation, so its first versions may be up to this far ahead of the last one it
/// issued: it must stay well under the replicas' drift bound (500 ms by default), or those
/// versions would be refused. The cost is one metadata write per lease of continuous writing.
pub(crate) const FLOOR_LEASE: Duration = Duration::from_millis(200);

/// The clock floor's reservation.
#[derive(Debug)]
pub(crate) struct Floor {
    /// Whether the storage keeps metadata across restarts at all.
    persistent: bool,
    /// Physical milliseconds up to which versions are covered by the stored floor.
    reserved_ms: AtomicU64,
    restored: Timestamp,
    lock: Mutex<()>,
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl Floor {
    /// Reads the stored floor (zero when none, or when the storage is volatile).
    pub(crate) async fn restore(
        storage: &SharedStorage,
        _now_ms: u64,
    ) -> Result<Self, StorageError> {
        let persistent = storage.capabilities().durability.is_persistent();
        let restored = if persistent {
            match storage.load_meta(FLOOR_META).await? {
                Some(b) => Timestamp::from_u64(decode_u64(&b).ok_or_else(|| {
                    StorageError::Corruption(format!("{FLOOR_META} is {} bytes, not 8", b.len()))
                })?),
                None => Timestamp::ZERO,
            }
        } else {
            Timestamp::ZERO
        };
        Ok(Floor {
            persistent,
            reserved_ms: AtomicU64::new(restored.physical_ms()),
            restored,
            lock: Mutex::new(()),
        })
    }

    /// The floor the clock starts above.
    pub(crate) fn restored(&self) -> Timestamp {
        self.restored
    }

    /// Makes sure the stored floor covers every version `hlc` has issued or observed so far
    /// (call after `now`/`observe` and before the version leaves the node or is stored).
    pub(crate) async fn cover<C: WallClock>(
        &self,
        hlc: &Hlc<C>,
        storage: &SharedStorage,
    ) -> Result<(), StorageError> {
        if !self.persistent {
            return Ok(());
        }
        let last = hlc.last().physical_ms();
        if last < self.reserved_ms.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.lock.lock().await;
        let last = hlc.last().physical_ms();
        if last < self.reserved_ms.load(Ordering::Acquire) {
            return Ok(());
        }
        let until = last.saturating_add(FLOOR_LEASE.as_millis() as u64);
        let floor = Timestamp::new(until.min(crate::hlc::MAX_PHYSICAL_MS), 0);
        storage
            .store_meta(
                FLOOR_META,
                Bytes::copy_from_slice(&floor.as_u64().to_be_bytes()),
            )
            .await?;
        self.reserved_ms
            .store(floor.physical_ms(), Ordering::Release);
        Ok(())
    }
}

/// This life's generation: the wall clock in milliseconds, or one above the last stored
/// generation if the clock went back; stored for the next start when storage is persistent.
pub(crate) async fn next_generation(
    storage: &SharedStorage,
    now_ms: u64,
) -> Result<u64, StorageError> {
    let mut generation = now_ms.clamp(1, MAX_GENERATION - 1);
    if storage.capabilities().durability.is_persistent() {
        if let Some(b) = storage.load_meta(GENERATION_META).await?
            && let Some(last) = decode_u64(&b)
        {
            generation = generation
                .max(last.saturating_add(1))
                .min(MAX_GENERATION - 1);
        }
        storage
            .store_meta(
                GENERATION_META,
                Bytes::copy_from_slice(&generation.to_be_bytes()),
            )
            .await?;
    }
    Ok(generation)
}
