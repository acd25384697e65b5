//! The two ways a simulated device talks to iotpipe. Each protocol provides a
//! [`Link`] per device; the fleet driver ([`crate::run`]) paces the device and hands
//! its messages to the link, which sends them and settles their outcome in the tally.

use std::future::Future;

use crate::chaos::Planned;

pub mod http;
pub mod mqtt;

/// One message: the events it carries and their wire form.
#[derive(Debug)]
pub struct Message {
    pub device: usize,
    pub items: Vec<Planned>,
    pub body: bytes::Bytes,
}

/// A device's connection to iotpipe.
pub trait Link: Send + 'static {
    /// Sends one message. Returns once the message is handed over; it waits while
    /// the link's in-flight window is full, which is how a slow server slows the
    /// simulator down.
    fn send(&mut self, msg: Message) -> impl Future<Output = ()> + Send;

    /// Waits for the outstanding acknowledgements (bounded), then closes.
    fn close(self) -> impl Future<Output = ()> + Send;
}
