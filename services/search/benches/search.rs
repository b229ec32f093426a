//! Search figures for docs/benchmarks.md: builds an index of synthetic chat messages
//! (default 1,000,000; 80 % words of a Zipf-like vocabulary, 20 % Chinese) directly through
//! the bulk writer in a temporary directory, then times queries through `Search::query`
//! (what `GET /v1/search` runs), and reports index bytes per message.
//!
//! A second part measures the region's own pipeline: `SEARCH_BENCH_FEED_MESSAGES` (default
//! 100,000) messages applied to an embedded store by `apply_batch` (which writes the search
//! feed), then the indexer task as the region runs it (one thread, 1 s commits) following
//! the feed until every message is searchable: the rate it sustains, to compare with the
//! rate messages arrive (W1 at 2,000 msg/s).
//!
//! Run: `cargo bench -p meridian-search --bench search` (`SEARCH_BENCH_MESSAGES=n` for
//! another size, `SEARCH_BENCH_THREADS=t` for more indexing threads; the region's indexer
//! uses one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_model::{ConversationId, EventId, Hlc, OrderKey, RegionId};
use meridian_search::{IndexBuilder, Search, SearchConfig, SearchMetrics, SearchQuery};
use meridian_store::search_feed::IndexableMessage;
use meridian_store::testing::{dir_bytes, TempStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CONVERSATIONS: usize = 20_000;
const USERS: usize = 5_000;
const VOCABULARY: usize = 20_000;
const QUERIES_PER_KIND: usize = 300;
/// The conversations of the user who searches (a busy user).
const MEMBER_OF: usize = 200;

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el", "is", "or", "un", "ba", "ch",
    "gr", "st", "tr",
];
const HAN: &str = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪官示冷域";

fn vocabulary(rng: &mut StdRng) -> Vec<String> {
    (0..VOCABULARY)
        .map(|_| {
            let n = rng.gen_range(2..5);
            (0..n)
                .map(|_| SYLLABLES[rng.gen_range(0..SYLLABLES.len())])
                .collect()
        })
        .collect()
}

/// A rank skewed towards the head, like word frequencies.
fn zipf(rng: &mut StdRng, n: usize) -> usize {
    let u: f64 = rng.gen();
    ((u * u * u) * n as f64) as usize % n
}

struct Corpus {
    words: Vec<String>,
    han: Vec<char>,
    conversations: Vec<ConversationId>,
}

impl Corpus {
    fn text(&self, rng: &mut StdRng) -> String {
        if rng.gen_bool(0.2) {
            let n = rng.gen_range(6..24);
            (0..n).map(|_| self.han[zipf(rng, self.han.len())]).collect()
        } else {
            let n = rng.gen_range(6..18);
            (0..n)
                .map(|_| self.words[zipf(rng, self.words.len())].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
}

/// Applies `n` messages to a fresh store in batches of 500 (one stream), then runs the
/// indexer as the region does; (apply rate, indexing rate) in messages/s.
async fn feed_pipeline(corpus: &Corpus, n: usize) -> anyhow::Result<(f64, f64)> {
    use meridian_store::testing::{apply_config, sequenced, EventFactory};
    let store = TempStore::open()?;
    let f = EventFactory::new("us");
    let cfg = apply_config("us");
    let mut rng = StdRng::seed_from_u64(7);
    let (cid, created) = f.direct("ann", "bob");
    let setup = vec![f.user("ann", "us"), f.user("bob", "us"), created];
    store
        .store
        .apply_batch(&cfg, "SYNC_us", &sequenced(&setup, 1))
        .await?;
    let mut seq = setup.len() as u64 + 1;
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 500).min(n))
            .map(|k| f.message("ann", &cid, &format!("m{k}"), &corpus.text(&mut rng)))
            .collect();
        let events = sequenced(&batch, seq);
        let mut done = 0;
        while done < events.len() {
            done += store
                .store
                .apply_batch(&cfg, "SYNC_us", &events[done..])
                .await?
                .consumed;
        }
        seq += batch.len() as u64;
        i += batch.len();
    }
    let applied = started.elapsed();
    let index_dir = tempfile::tempdir()?;
    let search = Search::open(
        SearchConfig::new(index_dir.path()),
        store.store.clone(),
        Arc::new(SearchMetrics::default()),
    )?;
    // Started on a store that has them all: an empty index rebuilds from the timelines;
    // let it build once, then time following the feed from a checkpoint instead.
    let token = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let (search, token) = (search.clone(), token.clone());
        async move { search.run(token).await }
    });
    while search.status().documents < n as u64 || search.status().lag_events > 0 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1_800), "indexing stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rebuilt = started.elapsed();
    token.cancel();
    task.await??;
    eprintln!("rebuild from the timelines: {n} messages in {rebuilt:?}");
    // Now the feed: as many messages again, applied first, then followed.
    let more: Vec<_> = (0..n)
        .map(|k| f.message("bob", &cid, &format!("n{k}"), &corpus.text(&mut rng)))
        .collect();
    for chunk in more.chunks(500) {
        let events = sequenced(chunk, seq);
        let mut done = 0;
        while done < events.len() {
            done += store
                .store
                .apply_batch(&cfg, "SYNC_us", &events[done..])
                .await?
                .consumed;
        }
        seq += chunk.len() as u64;
    }
    drop(search);
    let search = Search::open(
        SearchConfig::new(index_dir.path()),
        store.store.clone(),
        Arc::new(SearchMetrics::default()),
    )?;
    let token = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let (search, token) = (search.clone(), token.clone());
        async move { search.run(token).await }
    });
    while search.status().documents < 2 * n as u64 || search.status().lag_events > 0 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1_800), "indexing stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let followed = started.elapsed();
    token.cancel();
    task.await??;
    Ok((
        n as f64 / applied.as_secs_f64(),
        n as f64 / followed.as_secs_f64(),
    ))
}

/// Makes one query text of a kind.
type QueryMaker<'a> = Box<dyn Fn(&mut StdRng) -> String + 'a>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("SEARCH_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let threads: usize = std::env::var("SEARCH_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(12);
    let corpus = Corpus {
        words: vocabulary(&mut rng),
        han: HAN.chars().collect(),
        conversations: (0..CONVERSATIONS)
            .map(|i| ConversationId::parse(format!("g_{:032x}", i as u128 * 7919 + 1)))
            .collect::<Result<_, _>>()?,
    };
    let region = RegionId::parse("us")?;
    let dir = tempfile::Builder::new()
        .prefix("meridian-search-bench-")
        .tempdir()?;
    let index_dir = dir.path().join("index");

    // Indexing.
    let started = Instant::now();
    let mut builder = IndexBuilder::create(&index_dir, threads, 64)?;
    let mut text_bytes = 0usize;
    let base_ms = 1_750_000_000_000u64;
    for i in 0..n {
        let mut id = [0u8; 16];
        rng.fill(&mut id);
        let event_id = EventId::from_bytes(&id)?;
        let sent_at_ms = base_ms + i as u64 * 10;
        let text = corpus.text(&mut rng);
        text_bytes += text.len();
        let m = IndexableMessage {
            message_id: event_id,
            conversation_id: corpus.conversations[rng.gen_range(0..CONVERSATIONS)].clone(),
            order_key: OrderKey::new(Hlc(sent_at_ms << 16), region.clone(), event_id),
            sender: format!("user{}", rng.gen_range(0..USERS)),
            sent_at_ms,
            msg_type: "text".into(),
            body_json: serde_json::json!({ "text": text }).to_string(),
        };
        builder.add(&m)?;
        if (i + 1) % 200_000 == 0 {
            builder.commit()?;
            eprintln!("{} messages indexed after {:?}", i + 1, started.elapsed());
        }
    }
    let added = started.elapsed();
    builder.finish()?;
    let built = started.elapsed();
    let bytes = dir_bytes(&index_dir);

    // Queries, through what the gateway calls.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = rt.block_on(async {
        let store = TempStore::open()?;
        let search = Search::open(
            SearchConfig::new(&index_dir),
            store.store.clone(),
            Arc::new(SearchMetrics::default()),
        )?;
        let mut rng = StdRng::seed_from_u64(99);
        let kinds: Vec<(&str, QueryMaker)> = vec![
            ("common word", Box::new(|_: &mut StdRng| corpus.words[0].clone())),
            (
                "mid-frequency word",
                Box::new(|r: &mut StdRng| corpus.words[r.gen_range(100..1_000)].clone()),
            ),
            (
                "rare word",
                Box::new(|r: &mut StdRng| corpus.words[r.gen_range(10_000..VOCABULARY)].clone()),
            ),
            (
                "two words",
                Box::new(|r: &mut StdRng| {
                    format!(
                        "{} {}",
                        corpus.words[r.gen_range(0..50)],
                        corpus.words[r.gen_range(50..500)]
                    )
                }),
            ),
            (
                "Chinese, 2 characters",
                Box::new(|r: &mut StdRng| {
                    let a = corpus.han[r.gen_range(0..40)];
                    let b = corpus.han[r.gen_range(0..40)];
                    format!("{a}{b}")
                }),
            ),
            (
                "Chinese, 4 characters",
                Box::new(|r: &mut StdRng| (0..4).map(|_| corpus.han[r.gen_range(0..20)]).collect()),
            ),
        ];
        let mut out = Vec::new();
        for (name, make) in &kinds {
            let mut times = Vec::with_capacity(QUERIES_PER_KIND);
            let mut hits = 0usize;
            for _ in 0..QUERIES_PER_KIND {
                let conversations = (0..MEMBER_OF)
                    .map(|_| corpus.conversations[rng.gen_range(0..CONVERSATIONS)].clone())
                    .collect();
                let q = SearchQuery {
                    text: make(&mut rng),
                    conversations,
                    ..Default::default()
                };
                let t = Instant::now();
                let page = search.query(q, None, 21).await?;
                times.push(t.elapsed());
                hits += page.hits.len();
            }
            times.sort();
            out.push((
                *name,
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                hits as f64 / QUERIES_PER_KIND as f64,
            ));
        }
        anyhow::Ok(out)
    })?;

    let feed_n: usize = std::env::var("SEARCH_BENCH_FEED_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (applied_rate, indexed_rate) = rt.block_on(feed_pipeline(&corpus, feed_n))?;

    println!("messages: {n}, indexing threads: {threads}");
    println!(
        "pipeline ({feed_n} messages): apply_batch with the feed {applied_rate:.0} messages/s; \
         the indexer task following the feed {indexed_rate:.0} messages/s"
    );
    println!(
        "indexing: {:.0} messages/s adding ({:?}), {:.0} messages/s including the final commit and merges ({:?})",
        n as f64 / added.as_secs_f64(),
        added,
        n as f64 / built.as_secs_f64(),
        built
    );
    println!(
        "index: {bytes} bytes, {:.1} bytes per message (message text averages {:.1} bytes)",
        bytes as f64 / n as f64,
        text_bytes as f64 / n as f64
    );
    println!(
        "| query ({MEMBER_OF} conversations of {CONVERSATIONS}) | p50 | p99 | hits returned (21 asked, up to 39 fetched) |"
    );
    println!("|---|---|---|---|");
    for (name, p50, p99, hits) in figures {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {hits:.1} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
