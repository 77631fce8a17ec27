//! Backward passes of the fused operations, registered with burn's autodiff: the forward
//! runs the inner backend's kernels once and keeps only what the gradient needs.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Device, TensorMetadata};

use super::{ExpertFfnWeights, Gate, MoeBackend};

/// Saved for attention's backward: the inputs and the attention probabilities.
type AttentionState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

/// Registers each of `gradients` with the parent of the same index, where that parent is
/// tracked (`parents` are the ids of an op's parent nodes).
fn register<B: Backend, const N: usize>(
    grads: &mut Gradients,
    parents: [Option<NodeId>; N],
    gradients: [FloatTensor<B>; N],
) {
    for (parent, gradient) in parents.into_iter().zip(gradients) {
        if let Some(parent) = parent {
            grads.register::<B>(parent, gradient);
        }
    }
}

#[derive(Debug)]
struct CausalAttentionBackward;

impl<B: MoeBackend> Backward<B, 3> for CausalAttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, probs) = ops.state;
        let (dq, dk, dv) = B::causal_attention_backward(q, k, v, probs, grad);
        register::<B, 3>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [dq, dk, dv],
        );
    }
}

#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: MoeBackend> Backward<B, 2> for LinearCrossEntropyBackward {
    /// The input, the weight and the unit-gradient logits.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, dlogits) = ops.state;
        let (d_x, d_weight) = B::linear_cross_entropy_backward(x, weight, dlogits, grad);
        register::<B, 2>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [d_x, d_weight],
        );
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: MoeBackend> Backward<B, 2> for SwigluBackward {
    /// The inputs `(gate, up)`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (d_gate, d_up) = B::swiglu_backward(gate, up, grad);
        register::<B, 2>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [d_gate, d_up],
        );
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: MoeBackend> Backward<B, 2> for RmsNormBackward {
    /// The input, the scale and epsilon.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, epsilon) = ops.state;
        let (d_x, d_gamma) = B::rms_norm_backward(x, gamma, epsilon, grad);
        register::<B, 2>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [d_x, d_gamma],
        );
    }
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: MoeBackend> Backward<B, 1> for RotaryBackward {
    /// The angle tables `(cos, sin)`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rotary_backward(grad, cos, sin));
        }
    }
}

#[derive(Debug)]
struct TransferBackward;

impl<B: MoeBackend> Backward<B, 1> for TransferBackward {
    /// The device the input came from.
    type State = Device<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::transfer_forward(grad, &ops.state));
        }
    }
}

#[derive(Debug)]
struct PermuteBackward;

impl<B: MoeBackend> Backward<B, 1> for PermuteBackward {
    /// The slots and the number of tokens.
    type State = (IntTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (slot, tokens) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::permute_backward(grad, slot, tokens));
        }
    }
}

#[derive(Debug)]
struct CombineBackward;

impl<B: MoeBackend> Backward<B, 2> for CombineBackward {
    /// The expert outputs, the slots and the combine weights.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (buffer, slot, weights) = ops.state;
        let (d_buffer, d_weights) = B::combine_backward(buffer, slot, weights, grad);
        register::<B, 2>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [d_buffer, d_weights],
        );
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: MoeBackend> Backward<B, 2> for LinearBackward {
    /// The input rows and the weight.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let (d_x, d_w) = B::linear_backward(x, w, grad);
        for (node, grad) in [(node_x, d_x), (node_w, d_w)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct GroupedMatmulBackward;

impl<B: MoeBackend> Backward<B, 2> for GroupedMatmulBackward {
    /// The rows, the expert weights and the segment sizes.
    type State = (FloatTensor<B>, FloatTensor<B>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weights, counts) = ops.state;
        let (d_x, d_weights) = B::grouped_matmul_backward(x, weights, &counts, grad);
        register::<B, 2>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [d_x, d_weights],
        );
    }
}

#[derive(Debug)]
struct ExpertFfnBackward;

impl<B: MoeBackend> Backward<B, 4> for ExpertFfnBackward {
    /// The rows, the weights, the segment sizes and `[gate, up]`.
    type State = (
        FloatTensor<B>,
        ExpertFfnWeights<FloatTensor<B>>,
        Vec<usize>,
        [FloatTensor<B>; 2],
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weights, counts, pre_activations) = ops.state;
        let (d_x, d_weights) = B::expert_ffn_backward(x, weights, &counts, pre_activations, grad);
        // The parents' order: x, then the weights in `expert_ffn`'s order.
        register::<B, 4>(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [d_x, d_weights.gate, d_weights.up, d_weights.down],
        );
    }
}

#[derive(Debug)]
struct RouteBackward;

impl<B: MoeBackend> Backward<B, 1> for RouteBackward {
    /// The logits, the chosen experts, the weights and the gate.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, Gate);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits, experts, weights, gate) = ops.state;
        if let Some(node) = node_logits {
            let d_logits = B::route_backward(logits, experts, weights, grad, gate);
            grads.register::<B>(node.id, d_logits);
        }
    }
}

#[derive(Debug)]
struct RouterLossesBackward;

impl<B: MoeBackend> Backward<B, 1> for RouterLossesBackward {
    /// The logits, the counts, the gate and `k`.
    type State = (FloatTensor<B>, IntTensor<B>, Gate, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits, counts, gate, top_k) = ops.state;
        if let Some(node) = node_logits {
            let d_logits = B::router_losses_backward(logits, counts, gate, top_k, grad);
            grads.register::<B>(node.id, d_logits);
        }
    }
}

impl<B: MoeBackend, C: CheckpointStrategy> MoeBackend for Autodiff<B, C> {
    fn route(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        // The bias only orders the experts: it is not a parent.
        let bias = bias.primitive;
        match RouteBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (weights, experts) =
                    B::route_forward(logits.primitive.clone(), bias, gate, top_k);
                let state = (logits.primitive, experts.clone(), weights.clone(), gate);
                (prep.finish(state, weights), experts)
            }
            OpsKind::UnTracked(prep) => {
                let (weights, experts) = B::route_forward(logits.primitive, bias, gate, top_k);
                (prep.finish(weights), experts)
            }
        }
    }

    fn router_losses(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> FloatTensor<Self> {
        match RouterLossesBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let losses =
                    B::router_losses_forward(logits.primitive.clone(), counts.clone(), gate, top_k);
                prep.finish((logits.primitive, counts, gate, top_k), losses)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::router_losses_forward(
                logits.primitive,
                counts,
                gate,
                top_k,
            )),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::swiglu_forward(gate.primitive.clone(), up.primitive.clone());
                prep.finish((gate.primitive, up.primitive), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::swiglu_forward(gate.primitive, up.primitive))
            }
        }
    }

    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        match RmsNormBackward
            .prepare::<C>([x.node.clone(), gamma.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output =
                    B::rms_norm_forward(x.primitive.clone(), gamma.primitive.clone(), epsilon);
                prep.finish((x.primitive, gamma.primitive, epsilon), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rms_norm_forward(x.primitive, gamma.primitive, epsilon))
            }
        }
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The angle tables are constants: only `x` is a parent.
        let (cos, sin) = (cos.primitive, sin.primitive);
        match RotaryBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::rotary_forward(x.primitive, cos.clone(), sin.clone());
                prep.finish((cos, sin), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary_forward(x.primitive, cos, sin)),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        match CausalAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, probs) = B::causal_attention_forward(
                    q.primitive.clone(),
                    k.primitive.clone(),
                    v.primitive.clone(),
                );
                let state = (q.primitive, k.primitive, v.primitive, probs);
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::causal_attention(q.primitive, k.primitive, v.primitive))
            }
        }
    }

    fn run_compute<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        B::run_compute(work)
    }

    fn transfer(x: FloatTensor<Self>, device: &Device<Self>) -> FloatTensor<Self> {
        match TransferBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let from = B::float_device(&x.primitive);
                prep.finish(from, B::transfer_forward(x.primitive, device))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::transfer_forward(x.primitive, device)),
        }
    }

    /// Integer outputs carry no gradient: the inner backend's sort (its kernels, if any).
    fn expert_slots(
        experts: IntTensor<Self>,
        n_experts: usize,
        capacity: Option<usize>,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        B::expert_slots(experts, n_experts, capacity)
    }

    fn permute(x: FloatTensor<Self>, slot: IntTensor<Self>, rows: usize) -> FloatTensor<Self> {
        let [tokens, _] = x.primitive.shape().dims();
        match PermuteBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::permute_forward(x.primitive, slot.clone(), rows);
                prep.finish((slot, tokens), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::permute_forward(x.primitive, slot, rows)),
        }
    }

    fn combine(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match CombineBackward
            .prepare::<C>([buffer.node.clone(), weights.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::combine_forward(
                    buffer.primitive.clone(),
                    slot.clone(),
                    weights.primitive.clone(),
                );
                prep.finish((buffer.primitive, slot, weights.primitive), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::combine_forward(
                buffer.primitive,
                slot,
                weights.primitive,
            )),
        }
    }

    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        match LinearBackward
            .prepare::<C>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::linear_forward(x.primitive.clone(), w.primitive.clone());
                prep.finish((x.primitive, w.primitive), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_forward(x.primitive, w.primitive)),
        }
    }

    fn grouped_matmul(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        match GroupedMatmulBackward
            .prepare::<C>([x.node.clone(), weights.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::grouped_matmul_forward(
                    x.primitive.clone(),
                    weights.primitive.clone(),
                    counts,
                );
                prep.finish((x.primitive, weights.primitive, counts.to_vec()), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::grouped_matmul_forward(
                x.primitive,
                weights.primitive,
                counts,
            )),
        }
    }

    fn expert_ffn(
        x: FloatTensor<Self>,
        weights: ExpertFfnWeights<FloatTensor<Self>>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        let nodes = [&x, &weights.gate, &weights.up, &weights.down].map(|t| t.node.clone());
        let inner = weights.map(|w| w.primitive);
        match ExpertFfnBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, pre_activations) =
                    B::expert_ffn_forward(x.primitive.clone(), inner.clone(), counts);
                let state = (x.primitive, inner, counts.to_vec(), pre_activations);
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::expert_ffn_forward(x.primitive, inner, counts).0)
            }
        }
    }

    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match LinearCrossEntropyBackward
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (nll, dlogits) = B::linear_cross_entropy_forward(
                    x.primitive.clone(),
                    weight.primitive.clone(),
                    targets,
                );
                prep.finish((x.primitive, weight.primitive, dlogits), nll)
            }
            OpsKind::UnTracked(prep) => prep
                .finish(B::linear_cross_entropy_forward(x.primitive, weight.primitive, targets).0),
        }
    }
}
