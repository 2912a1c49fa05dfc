//! Issue 17, item 2: client keys share a saturated account by `weight`,
//! through the gateway against the mock. Paused time: an account of 600
//! RPM (10 calls a second), client buckets that never bind, callers that
//! keep calls waiting.

use super::*;

const HEAVY: &str = "gw-heavy-key-0003";
const LIGHT: &str = "gw-light-key-0004";

/// One account of 10 calls a second, waits up to 60 s; keys `heavy` and
/// `light` with these weights (0: the key is not configured).
async fn fair_env(heavy: u32, light: u32) -> Env {
    let m = mock().start().await.unwrap();
    let key = |name: &str, secret: &str, weight: u32| {
        if weight == 0 {
            return String::new();
        }
        format!(
            r#"
            [[keys]]
            name = "{name}"
            key = "{secret}"
            capacity = 100000
            refill_per_second = 100000
            weight = {weight}
            "#
        )
    };
    let text = format!(
        r#"
        [upstream]
        base_url = "{base}"
        admission_wait = "60s"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        [accounts.models.qwen-plus]
        rpm = 600
        tpm = 100000000
        {heavy}
        {light}
        "#,
        base = m.base_url(),
        heavy = key("heavy", HEAVY, heavy),
        light = key("light", LIGHT, light),
    );
    start_with(m, &text).await
}

/// `n` callers with `key`, each sending its next call when the last is
/// answered, until `end`; each 200 is logged with when it came.
fn callers(
    env: &Arc<Env>,
    key: &'static str,
    n: usize,
    end: Instant,
    log: &Arc<Mutex<Vec<(&'static str, Instant)>>>,
) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (env, log) = (env.clone(), log.clone());
            tokio::spawn(async move {
                let body = chat("qwen-plus", false);
                while Instant::now() < end {
                    let a = env.post(CHAT, Some(key), &body).await;
                    assert_eq!(a.status, 200, "{:?}", a.body);
                    log.lock().unwrap().push((key, Instant::now()));
                }
            })
        })
        .collect()
}

/// Two keys saturating the account with 20 waiting calls each: the
/// share of `heavy` over 40 s (after 5 s of warm-up), and the count.
async fn split(heavy: u32, light: u32) -> (f64, usize) {
    let env = Arc::new(fair_env(heavy, light).await);
    let log = Arc::default();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(45);
    let mut tasks = callers(&env, HEAVY, 20, end, &log);
    if light > 0 {
        tasks.extend(callers(&env, LIGHT, 20, end, &log));
    }
    tokio::time::sleep_until(end).await;
    for t in &tasks {
        t.abort();
    }
    let log = log.lock().unwrap();
    let from = t0 + Duration::from_secs(5);
    let window: Vec<_> = log.iter().filter(|(_, t)| *t >= from && *t < end).collect();
    let heavy_n = window.iter().filter(|(k, _)| *k == HEAVY).count();
    (heavy_n as f64 / window.len() as f64, window.len())
}

#[tokio::test(start_paused = true)]
async fn keys_share_a_saturated_account_by_weight() {
    let (share, n) = split(3, 1).await;
    assert!((share - 0.75).abs() <= 0.05, "3:1 gave {share:.3}");
    // Saturated: 10 a second.
    assert!((395..=405).contains(&n), "{n} calls in 40 s");
}

#[tokio::test(start_paused = true)]
async fn a_key_alone_gets_the_whole_account() {
    let (share, n) = split(1, 0).await;
    assert_eq!(share, 1.0);
    assert!(n >= 392, "{n} of 400 calls in 40 s");
}

/// The p99 wait of `heavy` (weight 9) sending every 500 ms for 40 s,
/// beside `light` (weight 1) keeping `light_waiters` calls waiting.
async fn heavy_p99(light_waiters: usize) -> Duration {
    let env = Arc::new(fair_env(9, 1).await);
    let log = Arc::default();
    let end = Instant::now() + Duration::from_secs(42);
    let light = callers(&env, LIGHT, light_waiters, end, &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut heavy = Vec::new();
    while Instant::now() + Duration::from_millis(500) < end {
        let env = env.clone();
        heavy.push(tokio::spawn(async move {
            let sent = Instant::now();
            let a = env.post(CHAT, Some(HEAVY), &chat("qwen-plus", false)).await;
            assert_eq!(a.status, 200);
            sent.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut waits = Vec::new();
    for h in heavy {
        waits.push(h.await.unwrap());
    }
    for t in &light {
        t.abort();
    }
    waits.sort();
    assert!(waits.len() >= 75, "{} calls", waits.len());
    waits[(waits.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_one_key_does_not_delay_a_heavier_one() {
    // Without the flood the light key still saturates the account, one
    // call at a time; with it, 200 at a time (20 s of backlog in arrival
    // order). The flood may add the one turn already given to one of its
    // calls when a heavy call arrives (100 ms at 10/s): the turn is given
    // when the previous call goes, and its slot is booked then.
    let calm = heavy_p99(1).await;
    let flood = heavy_p99(200).await;
    let turn = Duration::from_millis(100);
    assert!(
        flood <= calm + turn,
        "p99 wait of the heavy key: {flood:?} with the flood, {calm:?} without"
    );
    assert!(calm <= Duration::from_millis(200), "{calm:?}");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_while_waiting_gives_its_turn_back() {
    // 1 call a second.
    let m = mock().start().await.unwrap();
    let text = one_account(&m, "60s", "[accounts.models.qwen-plus]\nrpm = 60") + "weight = 2\n";
    let env = Arc::new(start_with(m, &text).await);
    let t0 = Instant::now();
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
    // Booked for 1 s; its client goes away at 500 ms.
    let gone = {
        let env = env.clone();
        tokio::spawn(async move { env.alice_chat("qwen-plus").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = {
        let env = env.clone();
        tokio::spawn(async move {
            let status = env.alice_chat("qwen-plus").await;
            (status, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    gone.abort();
    // The next call takes the slot given back, at 1 s, not 2 s.
    assert_eq!(next.await.unwrap(), (200, Duration::from_secs(1)));
    assert_eq!(env.mock.stats().requests, 2);
}

/// `weight` in `--check-config`: shown for every key (default 1), and a
/// weight of 0 refused, naming the field.
#[test]
fn check_config_shows_the_weights() {
    let run = |name: &str, weight: &str| {
        let path = std::env::temp_dir().join(format!(
            "tower-qwen-fair-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            format!(
                r#"
                [upstream]
                base_url = "http://127.0.0.1:9"
                [[accounts]]
                name = "main"
                api_key = "{UPSTREAM}"
                [[keys]]
                name = "heavy"
                key = "{HEAVY}"
                {weight}
                [[keys]]
                name = "light"
                key = "{LIGHT}"
                "#
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-gateway"))
            .args(["--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        out
    };
    let out = run("good", "weight = 3");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    let shown: toml::Table = stdout.parse().expect("the output is TOML");
    let weights: Vec<_> = shown["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["weight"].as_integer())
        .collect();
    assert_eq!(weights, [Some(3), Some(1)]);

    let out = run("bad", "weight = 0");
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("keys[0].weight") && stderr.contains("from 1 to 1000000"),
        "{stderr}"
    );
}
