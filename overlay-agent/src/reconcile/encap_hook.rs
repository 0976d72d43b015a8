//! Encap on the pod bridge: attached when the bridge appears, and again when it is recreated.

use tracing::{error, info, warn};

use crate::dataplane::Dataplane;

/// Attaches encap to the pod bridge when it appears, and again when it is recreated.
pub struct BridgeWatch {
    name: String,
    attached_ifindex: Option<u32>,
    warned: bool,
}

impl BridgeWatch {
    pub fn new(name: &str) -> Self {
        BridgeWatch {
            name: name.to_string(),
            attached_ifindex: None,
            warned: false,
        }
    }

    pub fn check(&mut self, dp: &mut Dataplane) {
        let ifindex = nix::net::if_::if_nametoindex(self.name.as_str()).ok();
        if ifindex == self.attached_ifindex {
            return;
        }
        match ifindex {
            None => {
                if !self.warned {
                    warn!(bridge = %self.name, "pod bridge not there yet; will attach when it appears");
                    self.warned = true;
                }
                self.attached_ifindex = None;
            }
            Some(idx) => match dp.attach_encap(&self.name) {
                Ok(()) => {
                    info!(bridge = %self.name, ifindex = idx, "encap attached");
                    self.attached_ifindex = Some(idx);
                    self.warned = false;
                }
                Err(e) => error!(bridge = %self.name, error = %e, "attaching encap"),
            },
        }
    }
}
