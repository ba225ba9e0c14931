//! Routing: which shard owns a record, and the rings that carry batches there.
//!
//! `partition_by = "none"` keeps a record on the shard that received it;
//! `"peer"` sends it to the shard that owns a hash of the sender's address, so
//! one sender's records always land on one shard, in order; `{ field = … }`
//! to the shard that owns a hash of a decoded field's value (a device's tag),
//! so one key's records always land on one shard, in order.
//!
//! The [`Mesh`] is one `rtrb` SPSC ring per ordered pair of shards (k→j, k≠j)
//! carrying whole batches, plus a ring back (j→k) that returns the emptied
//! batches to k's pool so neither side allocates in steady state. A shard
//! that finds its inbound rings empty parks on a [`ShardWake`] and is woken by
//! the producer; a producer that finds a ring full waits on the same struct of
//! the consumer's side. The mesh is built once at start-up; nothing here
//! allocates afterwards.

use crate::record::Batch;
use rtrb::{Consumer, Producer, RingBuffer};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Notify;

/// Batches a ring k→j holds before k's sources wait.
pub const RING_BATCHES: usize = 16;
/// The return ring holds every batch that can be in flight k→j and more, so
/// returning never has to wait.
pub const RETURN_RING_BATCHES: usize = 2 * RING_BATCHES;
const _: () = assert!(RETURN_RING_BATCHES >= RING_BATCHES);

/// A batch on its way to another shard, with the generation of the plan
/// it was routed by (see `PlanCell::generation`): a shard that runs another
/// generation (a reload is being applied) routes its records by its own.
#[derive(Debug)]
pub struct Crossing {
    pub batch: Batch,
    pub generation: u32,
}

/// Wake-ups of one shard, set by the others.
#[derive(Debug, Default)]
pub struct ShardWake {
    /// A ring into this shard has a new batch.
    pub data: Notify,
    /// A ring out of this shard has room again.
    pub space: Notify,
}

/// One shard's ends of the mesh. Indexed by the other shard's id; `None` at
/// the shard's own index.
pub struct ShardEnds {
    pub shard: usize,
    /// Batches to shard j.
    pub out: Vec<Option<Producer<Crossing>>>,
    /// Batches from shard k.
    pub inbound: Vec<Option<Consumer<Crossing>>>,
    /// Emptied batches back to shard k, whose pool they belong to.
    pub returns_out: Vec<Option<Producer<Batch>>>,
    /// This shard's batches coming back from shard j.
    pub returns_in: Vec<Option<Consumer<Batch>>>,
    pub wakes: Arc<Vec<ShardWake>>,
}

/// The N×N mesh of rings, split into each shard's ends.
pub struct Mesh;

impl Mesh {
    /// Builds the rings for `shards` shards and hands out each shard's ends.
    pub fn build(shards: usize) -> Vec<ShardEnds> {
        let wakes: Arc<Vec<ShardWake>> =
            Arc::new((0..shards).map(|_| ShardWake::default()).collect());
        let mut ends: Vec<ShardEnds> = (0..shards)
            .map(|k| ShardEnds {
                shard: k,
                out: (0..shards).map(|_| None).collect(),
                inbound: (0..shards).map(|_| None).collect(),
                returns_out: (0..shards).map(|_| None).collect(),
                returns_in: (0..shards).map(|_| None).collect(),
                wakes: wakes.clone(),
            })
            .collect();
        for k in 0..shards {
            for j in 0..shards {
                if k == j {
                    continue;
                }
                let (p, c) = RingBuffer::new(RING_BATCHES);
                ends[k].out[j] = Some(p);
                ends[j].inbound[k] = Some(c);
                let (p, c) = RingBuffer::new(RETURN_RING_BATCHES);
                ends[j].returns_out[k] = Some(p);
                ends[k].returns_in[j] = Some(c);
            }
        }
        ends
    }
}

/// A stable 32-bit hash of a peer's address (IP and port).
#[inline]
pub fn peer_key(addr: &SocketAddr) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    };
    match addr {
        SocketAddr::V4(a) => mix(u32::from(*a.ip()) as u64),
        SocketAddr::V6(a) => {
            let v = u128::from(*a.ip());
            mix(v as u64);
            mix((v >> 64) as u64);
        }
    }
    mix(addr.port() as u64);
    let h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32
}

/// The partition key of a field's value (`partition_by = { field }`):
/// CRC-32C (a few cycles per 8 bytes here) with a final mix, so that the
/// high bits [`owner`] reads are spread.
#[inline]
pub fn value_key(value: &[u8]) -> u32 {
    let mut h = crate::record::crc32c(value);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The shard that owns `key`.
#[inline]
pub fn owner(key: u32, shards: usize) -> usize {
    // Lemire's multiply-shift: uniform without a division.
    ((key as u64 * shards as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_spread_over_shards_and_stay_put() {
        let mut counts = [0usize; 4];
        for port in 40000..40400u16 {
            let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let o = owner(peer_key(&a), 4);
            assert_eq!(o, owner(peer_key(&a), 4));
            counts[o] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    #[test]
    fn mesh_carries_and_returns_batches() {
        let mut ends = Mesh::build(3);
        let mut b = Batch::default();
        b.push(1, 2, 0, b"hello", &[]);
        let c = Crossing {
            batch: b,
            generation: 1,
        };
        ends[0].out[2].as_mut().unwrap().push(c).unwrap();
        let got = ends[2].inbound[0].as_mut().unwrap().pop().unwrap().batch;
        assert_eq!(got.record(0), b"hello");
        ends[2].returns_out[0].as_mut().unwrap().push(got).unwrap();
        assert!(ends[0].returns_in[2].as_mut().unwrap().pop().is_ok());
        assert!(ends[1].out[1].is_none());
    }
}
