//! What the expiry passes saw of the two flow tables, with warnings as they fill up.

use log::{info, warn};

use crate::{config::Limits, datapath};

/// What the last expiry pass saw of one flow table, with a warning when it crosses 90 % (said
/// again when it is back under 80 %).
pub(super) struct Fill {
    pub(super) active: u64,
    /// Flows that fit (two conntrack entries each).
    pub(super) capacity: u64,
    high: bool,
    /// What reaching the top means, and what to do.
    full: &'static str,
}

impl Fill {
    fn new(entries: u32, full: &'static str) -> Self {
        Self {
            active: 0,
            capacity: u64::from(entries / 2),
            high: false,
            full,
        }
    }

    fn update(&mut self, table: &str, active: u64) {
        self.active = active;
        if !self.high && active * 10 >= self.capacity * 9 {
            self.high = true;
            warn!(
                "{table} {active}/{} flows (>= 90 %): {}",
                self.capacity, self.full
            );
        } else if self.high && active * 10 < self.capacity * 8 {
            self.high = false;
            info!("{table} back under 80 % ({active}/{} flows)", self.capacity);
        }
    }
}

/// The two flow tables: assured flows (never evicted) and flows not assured yet (shed first).
pub(super) struct FlowTable {
    pub(super) assured: Fill,
    pub(super) new: Fill,
}

impl FlowTable {
    pub(super) fn new(limits: &Limits) -> Self {
        Self {
            assured: Fill::new(
                limits.conntrack_entries,
                "when full, new flows stay unassured and may be shed; raise limits.conntrack_entries",
            ),
            new: Fill::new(
                limits.conntrack_new_entries,
                "flows that have not completed a handshake are being shed (a SYN flood?); \
                 established flows are not affected; raise limits.conntrack_new_entries if this is normal load",
            ),
        }
    }

    pub(super) fn update(&mut self, plan: &datapath::ExpiryPlan) {
        self.assured.update("flow table", plan.live_flows);
        self.new.update("table of new flows", plan.new_flows);
    }
}
