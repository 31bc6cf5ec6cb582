//! The counters of an fphash device ([`FphashStats`]): batches, records by status, rejections;
//! bumped by the device, read by the VMM while it runs.

use std::sync::atomic::AtomicU64;

use super::wire::RecordStatus;
use crate::counters;

counters! {
    /// Counters of an fphash device, shared with the VMM (see
    /// [`FphashDevice::stats`](super::FphashDevice::stats)).
    pub struct FphashStats, copied as FphashStatsSnapshot {
        /// Batches answered with `BATCH_OK`.
        batches,
        /// Records in those batches.
        records,
        /// Chains rejected as `BAD_REQUEST` (whether or not an answer could be written), and
        /// available rings whose index runs more than a queue ahead.
        rejected_batches,
        /// Chains returned with used length 0: no writable part of at least 4 bytes in guest RAM
        /// to write the response to.
        unanswered,
        /// Records answered [`RecordStatus::Merged`].
        merged,
        /// Records answered [`RecordStatus::Already`].
        already,
        /// Records answered [`RecordStatus::Mismatch`].
        mismatch,
        /// Records answered [`RecordStatus::BadGpa`].
        bad_gpa,
        /// Records answered [`RecordStatus::BadRecord`].
        bad_record,
        /// Records answered [`RecordStatus::NoRoom`].
        no_room,
        /// Records answered [`RecordStatus::Off`].
        off,
        /// Records answered [`RecordStatus::Done`].
        done,
        /// ADDED records handed to the merger without a hash
        /// ([`F_HOST_HASH`](super::wire::F_HOST_HASH) negotiated).
        host_hashed,
    }
}

impl FphashStatsSnapshot {
    /// The count of records answered `status`.
    pub fn status(&self, status: RecordStatus) -> u64 {
        match status {
            RecordStatus::Merged => self.merged,
            RecordStatus::Already => self.already,
            RecordStatus::Mismatch => self.mismatch,
            RecordStatus::BadGpa => self.bad_gpa,
            RecordStatus::BadRecord => self.bad_record,
            RecordStatus::NoRoom => self.no_room,
            RecordStatus::Off => self.off,
            RecordStatus::Done => self.done,
        }
    }
}

impl FphashStats {
    /// The counter of records answered `status`.
    pub fn status_counter(&self, status: RecordStatus) -> &AtomicU64 {
        match status {
            RecordStatus::Merged => &self.merged,
            RecordStatus::Already => &self.already,
            RecordStatus::Mismatch => &self.mismatch,
            RecordStatus::BadGpa => &self.bad_gpa,
            RecordStatus::BadRecord => &self.bad_record,
            RecordStatus::NoRoom => &self.no_room,
            RecordStatus::Off => &self.off,
            RecordStatus::Done => &self.done,
        }
    }
}
