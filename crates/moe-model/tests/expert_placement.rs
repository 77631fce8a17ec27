//! Expert placement: a layer whose experts are spread over several devices (expert `e` on
//! device `e mod D`) computes the same outputs and gradients as the same layer on one
//! device, and records the same stacked weights. On the CPU backends the devices are
//! several handles of the one CPU device; on wgpu two separate devices (lavapipe's CPU
//! adapter opened twice), so the tokens really travel between them.

mod common;

use burn::module::{Module, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use moe_model::ExpertWeights;
use moe_model::{MoeBackend, MoeConfig, MoeLayer};

/// A layer with `bias` as its selection bias (to steer tokens away from some experts).
fn layer_with_bias<B: AutodiffBackend + MoeBackend>(
    d: usize,
    config: &MoeConfig,
    bias: Option<&[f32]>,
    device: &B::Device,
) -> MoeLayer<B> {
    let mut layer = moe_layer::<B>(d, config, 0.7, 900, device);
    if let Some(bias) = bias {
        let bias = Tensor::from_data(TensorData::new(bias.to_vec(), [bias.len()]), device);
        layer.router.expert_bias = Param::from_tensor(bias);
    }
    layer
}

/// The rows `experts` of a stacked `[E, a, b]` tensor.
fn rows<B: burn::tensor::backend::Backend>(w: Tensor<B, 3>, experts: &[usize]) -> Vec<f64> {
    let index: Vec<i64> = experts.iter().map(|&e| e as i64).collect();
    let index =
        Tensor::<B, 1, Int>::from_data(TensorData::new(index, [experts.len()]), &w.device());
    host(w.select(0, index))
}

fn weights_of<B: burn::tensor::backend::Backend>(shard: &ExpertWeights<B>) -> [Tensor<B, 3>; 3] {
    [shard.w1.val(), shard.w2.val(), shard.w3.val()]
}

fn placed_layer_matches_one_device<B: AutodiffBackend + MoeBackend>(devices: &[B::Device]) {
    let home = &devices[0];
    let (tokens, d) = (13, 6);
    let dropless = moe_config(4, 2, 5);
    let capacity = MoeConfig {
        capacity_factor: Some(0.5),
        ..moe_config(4, 2, 5)
    };
    let single_expert = moe_config(5, 1, 3);
    // name, config, selection bias, number of devices
    let cases: [(&str, &MoeConfig, Option<&[f32]>, usize); 5] = [
        ("dropless", &dropless, None, 2),
        ("capacity overflow", &capacity, None, 2),
        ("one expert per device", &capacity, None, 4),
        // Experts 1 and 3 (device 1) receive no token: device 1 is skipped.
        (
            "idle device",
            &dropless,
            Some(&[10.0, -10.0, 10.0, -10.0]),
            2,
        ),
        // k = 1, E = 5 over 3 devices: shards of 2, 2 and 1 experts.
        ("uneven shards", &single_expert, None, 3),
    ];
    for (name, config, bias, count) in cases {
        let placement: Vec<B::Device> = (0..count)
            .map(|s| devices[s % devices.len()].clone())
            .collect();
        let layer = layer_with_bias::<B>(d, config, bias, home);
        let mut placed = layer.clone();
        placed.experts = placed.experts.place(&placement);
        assert_eq!(placed.experts.shards.len(), count, "{name}: shards");
        for (s, shard) in placed.experts.shards.iter().enumerate() {
            assert_eq!(shard.device(), placement[s], "{name}: shard {s} device");
        }

        let x = tensor::<B, 2>([tokens, d], 31, home);
        let probe = tensor::<B, 2>([tokens, d], 32, home);
        let run = |layer: &MoeLayer<B>| {
            let x = x.clone().require_grad();
            let out = layer.forward(x.clone());
            let loss = (out.output.clone() * probe.clone()).sum()
                + out.balance_loss * 0.1
                + out.z_loss * 0.1;
            let grads = loss.backward();
            (out.output, x.grad(&grads), grads)
        };
        let (out, x_grad, grads) = run(&layer);
        let (placed_out, placed_x_grad, placed_grads) = run(&placed);
        assert_close(
            &host(placed_out),
            &host(out),
            1e-5,
            &format!("{name}: output"),
        );
        assert_close(
            &host(placed_x_grad.expect("input gradient")),
            &host(x_grad.expect("input gradient")),
            1e-5,
            &format!("{name}: input gradient"),
        );
        assert_close(
            &host(
                placed
                    .router
                    .gate
                    .weight
                    .grad(&placed_grads)
                    .expect("router gradient"),
            ),
            &host(
                layer
                    .router
                    .gate
                    .weight
                    .grad(&grads)
                    .expect("router gradient"),
            ),
            1e-5,
            &format!("{name}: router gradient"),
        );
        let full = &layer.experts.shards[0];
        let n_experts = config.n_experts;
        for (s, shard) in placed.experts.shards.iter().enumerate() {
            let experts: Vec<usize> = (s..n_experts).step_by(count).collect();
            for (i, (weight, whole)) in weights_of(shard)
                .into_iter()
                .zip(weights_of(full))
                .enumerate()
            {
                let what = format!("{name}: shard {s} w{}", i + 1);
                assert_close(&host(weight), &rows(whole, &experts), 0.0, &what);
            }
            let shard_grads = [&shard.w1, &shard.w2, &shard.w3].map(|w| w.grad(&placed_grads));
            let full_grads = [&full.w1, &full.w2, &full.w3].map(|w| w.grad(&grads));
            for (i, (got, whole)) in shard_grads.into_iter().zip(full_grads).enumerate() {
                let what = format!("{name}: shard {s} w{} gradient", i + 1);
                let expected = whole.map_or_else(Vec::new, |g| rows(g, &experts));
                match got {
                    Some(got) => assert_close(&host(got), &expected, 1e-5, &what),
                    // A device whose experts saw no token gets no gradient: the same
                    // rows of the one-device gradient are zero.
                    None => assert!(expected.iter().all(|g| *g == 0.0), "{what}: missing"),
                }
            }
        }
        if bias.is_some() {
            assert!(
                placed.experts.shards[1].w1.grad(&placed_grads).is_none(),
                "{name}: the idle device's experts got a gradient"
            );
        }
    }
}

/// A placed layer records the stacked weights and ids of the one-device layer, and loading
/// a record into a placed layer keeps the placement.
fn placement_does_not_change_the_record<B: AutodiffBackend + MoeBackend>(devices: &[B::Device]) {
    let home = &devices[0];
    let layer = layer_with_bias::<B>(4, &moe_config(4, 2, 3), None, home);
    let mut placed = layer.clone();
    placed.experts = placed.experts.place(devices);

    let record = layer.experts.clone().into_record();
    let placed_record = placed.experts.clone().into_record();
    for (whole, from_placed) in [
        (&record.w1, &placed_record.w1),
        (&record.w2, &placed_record.w2),
        (&record.w3, &placed_record.w3),
    ] {
        assert_eq!(whole.id, from_placed.id, "recorded parameter id");
        assert_close(
            &host(from_placed.val()),
            &host(whole.val()),
            0.0,
            "recorded weights",
        );
    }

    // Loading the one-device record into a placed layer whose weights differ.
    let other = layer_with_bias::<B>(4, &moe_config(4, 2, 3), None, home);
    let mut other_placed = other.clone();
    other_placed.experts = other.experts.place(devices).load_record(record);
    assert_eq!(
        other_placed.experts.shards.len(),
        devices.len(),
        "placement kept"
    );
    let ids = |experts: &moe_model::Experts<B>| -> Vec<_> {
        experts
            .shards
            .iter()
            .flat_map(|s| [s.w1.id, s.w2.id, s.w3.id])
            .collect()
    };
    assert_eq!(
        ids(&other_placed.experts),
        ids(&placed.experts),
        "shard ids derive from the record"
    );
    for (a, b) in other_placed
        .experts
        .shards
        .iter()
        .zip(&placed.experts.shards)
    {
        for (a, b) in weights_of(a).into_iter().zip(weights_of(b)) {
            assert_close(&host(a), &host(b), 0.0, "loaded shard weights");
        }
    }
    // Placing on one device gathers the experts back.
    let gathered = placed.experts.place(&devices[..1]);
    assert_eq!(gathered.shards.len(), 1);
    for (a, b) in weights_of(&gathered.shards[0])
        .into_iter()
        .zip(weights_of(&layer.experts.shards[0]))
    {
        assert_close(&host(a), &host(b), 0.0, "gathered weights");
    }
}

macro_rules! cpu_tests {
    ($name:ident, $backend:ty) => {
        mod $name {
            type B = burn::backend::Autodiff<$backend>;
            /// Three handles of the one CPU device.
            fn devices() -> Vec<burn::tensor::Device<B>> {
                vec![Default::default(); 3]
            }
            #[test]
            fn placed_layer_matches_one_device() {
                super::placed_layer_matches_one_device::<B>(&devices());
            }
            #[test]
            fn placement_does_not_change_the_record() {
                super::placement_does_not_change_the_record::<B>(&devices()[..2]);
            }
        }
    };
}

cpu_tests!(flex, burn::backend::Flex);
cpu_tests!(ndarray, burn::backend::NdArray);

mod wgpu {
    use burn::backend::wgpu::WgpuDevice;
    type B = burn::backend::Autodiff<burn::backend::Wgpu>;

    /// Two devices with their own memory (on lavapipe both are the CPU adapter).
    fn devices() -> Vec<WgpuDevice> {
        vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu]
    }

    #[test]
    fn placed_layer_matches_one_device() {
        super::placed_layer_matches_one_device::<B>(&devices());
    }

    #[test]
    fn placement_does_not_change_the_record() {
        super::placement_does_not_change_the_record::<B>(&devices());
    }
}
