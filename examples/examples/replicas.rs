//! Three replicas in one process: the foundations working together.
//!
//! Each node has a memory backend (opened by name through the registry), an HLC, and an RPC
//! endpoint on an in-process network. A hand-written coordinator places a key with the ring,
//! stamps a version, sends `Put` to the key's three replicas and counts acknowledgements
//! against W = 2. Then the network is partitioned and the same write is reported as failed,
//! with how many replicas acknowledged; after healing, a write stamped a minute in the future
//! is refused by every replica's clock-drift check, and a read at R = 2 returns the newest
//! version. The real coordinator (with hinted handoff and read repair) is later work; this
//! demo exists to show the pieces it will be built from.
//!
//! Run: `cargo run -p chorus-examples --example replicas`

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus::StorageSpec;
use chorus::hlc::{SystemClock, WallClock};
use chorus::replication::ReplicaMessage;
use chorus::runtime::inproc::{InProcessNetwork, InProcessTransport};
use chorus::runtime::rpc::{RpcConfig, RpcEndpoint};
use chorus::{
    Address, Hlc, NodeId, Record, Ring, RingConfig, RingMember, SharedStorage, Storage, Timestamp,
    Version,
};
use futures::future::join_all;

const N: NonZeroUsize = NonZeroUsize::new(3).unwrap();
const W: usize = 2;
const R: usize = 2;
const TIMEOUT: Duration = Duration::from_millis(200);

/// Serves `Put` and `Get` from one node's storage until its transport closes.
fn spawn_replica(
    hlc: Arc<Hlc>,
    storage: SharedStorage,
    endpoint: RpcEndpoint<InProcessTransport, ReplicaMessage>,
    mut inbound: tokio::sync::mpsc::Receiver<chorus::runtime::rpc::Inbound<ReplicaMessage>>,
) {
    tokio::spawn(async move {
        while let Some(request) = inbound.recv().await {
            let reply = match &request.message {
                // A version too far ahead of this replica's clock would win every later write
                // to the key: refuse it (and keep the local clock ahead of what it stores).
                ReplicaMessage::Put { record, .. }
                    if hlc.observe(record.version.timestamp).is_err() =>
                {
                    ReplicaMessage::Error {
                        reason: "version too far in the future".into(),
                    }
                }
                ReplicaMessage::Put { key, record } => {
                    match storage.apply(key.clone(), record.clone()).await {
                        Ok(outcome) => ReplicaMessage::PutReply {
                            applied: outcome.is_applied(),
                            current: outcome.current_version(&record.version),
                        },
                        Err(e) => ReplicaMessage::Error {
                            reason: e.to_string(),
                        },
                    }
                }
                ReplicaMessage::Get { key } => match storage.get(key).await {
                    Ok(record) => ReplicaMessage::GetReply { record },
                    Err(e) => ReplicaMessage::Error {
                        reason: e.to_string(),
                    },
                },
                _ => ReplicaMessage::Error {
                    reason: "unsupported".into(),
                },
            };
            if let Err(e) = endpoint.respond(&request, &reply).await {
                eprintln!("reply failed: {e}");
            }
        }
    });
}

/// Writes to every replica at once and counts acknowledgements; success needs `W`.
async fn write(
    client: &RpcEndpoint<InProcessTransport, ReplicaMessage>,
    replicas: &[Address],
    key: &Bytes,
    record: Record,
) -> Result<usize, String> {
    let message = ReplicaMessage::Put {
        key: key.clone(),
        record,
    };
    let requests = replicas
        .iter()
        .map(|to| client.request(to, &message, TIMEOUT));
    let acks = join_all(requests)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(ReplicaMessage::PutReply { .. })))
        .count();
    if acks >= W {
        Ok(acks)
    } else {
        Err(format!(
            "write not acknowledged: {acks} of {W} required replicas acked"
        ))
    }
}

/// Reads from every replica, needs `R` answers, returns the merged (newest) record.
async fn read(
    client: &RpcEndpoint<InProcessTransport, ReplicaMessage>,
    replicas: &[Address],
    key: &Bytes,
) -> Result<Option<Record>, String> {
    let message = ReplicaMessage::Get { key: key.clone() };
    let answers: Vec<Option<Record>> = join_all(
        replicas
            .iter()
            .map(|to| client.request(to, &message, TIMEOUT)),
    )
    .await
    .into_iter()
    .filter_map(|r| match r {
        Ok(ReplicaMessage::GetReply { record }) => Some(record),
        _ => None,
    })
    .collect();
    if answers.len() < R {
        return Err(format!(
            "read not answered: {} of {R} required replicas answered",
            answers.len()
        ));
    }
    Ok(answers.into_iter().flatten().reduce(Record::merge))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = chorus::registry();
    let network = InProcessNetwork::new(7);
    let ids = [NodeId(1), NodeId(2), NodeId(3)];
    let addr = |id: NodeId| Address::new(format!("node-{}", id.0));

    for id in ids {
        let storage = registry.open_backend(&StorageSpec::new("memory"))?;
        let (endpoint, inbound) = RpcEndpoint::start(network.bind(addr(id))?, RpcConfig::default());
        spawn_replica(Arc::new(Hlc::system()), storage, endpoint, inbound);
    }
    let client_addr = Address::new("client");
    let (client, _inbound) =
        RpcEndpoint::start(network.bind(client_addr.clone())?, RpcConfig::default());

    let ring = Ring::new(ids.map(RingMember::new), RingConfig::default())?;
    let key = Bytes::from_static(b"greeting");
    let replicas: Vec<Address> = ring
        .preference_list(&key, N)
        .into_iter()
        .map(addr)
        .collect();
    println!(
        "key {:?} lives on {:?}",
        "greeting",
        replicas.iter().map(Address::as_str).collect::<Vec<_>>()
    );

    let coordinator = NodeId(100);
    let hlc = Arc::new(Hlc::system());
    let first = Record::value("hello", Version::new(hlc.now(), coordinator));
    println!(
        "write v1 at W={W}: {:?}",
        write(&client, &replicas, &key, first)
            .await
            .map(|acks| format!("{acks} acks"))
    );

    network.partition(std::slice::from_ref(&client_addr), &replicas[1..]);
    let second = Record::value("hello again", Version::new(hlc.now(), coordinator));
    println!(
        "write v2 with two replicas cut off: {:?}",
        write(&client, &replicas, &key, second).await
    );

    network.heal();
    let from_the_future = Timestamp::new(SystemClock.now_ms() + 60_000, 0);
    let rogue = Record::value(
        "from a broken clock",
        Version::new(from_the_future, NodeId(666)),
    );
    println!(
        "write stamped one minute ahead, all replicas reachable: {:?}",
        write(&client, &replicas, &key, rogue).await
    );

    let newest = read(&client, &replicas, &key).await?;
    let shown = newest
        .as_ref()
        .and_then(|r| r.live_value(SystemClock.now_ms()))
        .map(|v| String::from_utf8_lossy(v).into_owned());
    println!(
        "read at R={R} after healing: {shown:?} (the unacknowledged v2 reached one replica and, being newer, wins)"
    );
    println!("network: {:?}", network.stats());
    Ok(())
}
