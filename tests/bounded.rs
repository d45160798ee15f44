//! Bounded state and hostile input, against a real sidecar:
//! - reads create nothing in Redis;

mod common;

use common::calls::usage;
use common::redis::RedisServer;
use common::requests;
use common::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_unknown_portfolios_create_no_redis_keys() {
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nhash_key = \"bounded-test-hash-key\"\n\n\
         [policy]\nscope = \"phone_number\"\nladder = \"legacy\"\n",
        redis.url()
    );
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    for i in 0..50 {
        usage(&mut c, &format!("nobody-{i}"), "n1").await;
        c.get_portfolio(requests::portfolio(&format!("nobody-{i}"))).await.unwrap();
    }
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "keys: {}", redis.cli(&["--scan"]));
}
