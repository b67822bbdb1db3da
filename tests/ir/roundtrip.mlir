builtin.module attributes {plait.symbols = #plait.symbols<batch = [1, 64], seq = [2, inf]>, plait.mesh = #plait.mesh<tp = 2>} {
  func.func @forward(%input_ids : !plait.tensor<[batch, seq], i64>) -> !plait.tensor<[batch, floordiv(seq, 2), 32], f32> {
    %w = plait.param "model.embed.weight" : !plait.tensor<[128, 16], f32> loc("model.embed")
    %b = plait.param buffer "model.b" : !plait.tensor<[16], f32>
    %e = plait.embedding "aten::embedding"(%w, %input_ids) : !plait.tensor<[batch, seq, 16], f32> loc("model.embed")
    %v = plait.reshape "aten::view"(%e, [sym(batch*seq), -1]) : !plait.tensor<[batch*seq, 16], f32>
    %a = plait.elementwise "aten::add.Tensor"(%e, 1.0e-06, alpha = 1) : !plait.tensor<[batch, seq, 16], f32>
    %c = plait.elementwise "aten::to.dtype_layout"(%a, dtype = dtype(f32), layout = layout(strided), device = device("cpu")) : !plait.tensor<[batch, seq, 16], f32>
    %t:2 = plait.call "aten::topk"(%c, 2) : (!plait.tensor<[batch, seq, 2], f32>, !plait.tensor<[batch, seq, 2], i64>)
    %p = plait.elementwise "aten::gt.Scalar"(%c, 0.0) : !plait.tensor<[batch, seq, 16], i1>
    %m = plait.elementwise "aten::masked_fill.Scalar"(%c, %p, -inf) : !plait.tensor<[batch, seq, 16], f32>
    %r = plait.all_reduce %m {axis = "tp", reduce = "sum"} : !plait.tensor<[batch, seq, 16], f32> -> !plait.tensor<[batch, seq, 16], f32>
    %h = plait.all_reduce %r {axis = "tp", reduce = "sum", async} : !plait.tensor<[batch, seq, 16], f32> -> !plait.async<!plait.tensor<[batch, seq, 16], f32>>
    %w2 = plait.wait %h : !plait.async<!plait.tensor<[batch, seq, 16], f32>> -> !plait.tensor<[batch, seq, 16], f32>
    %g = plait.all_gather %w2 {axis = "tp", dim = 2 : i64} : !plait.tensor<[batch, seq, 16], f32> -> !plait.tensor<[batch, seq, 32], f32>
    %f = plait.reshape "aten::slice.Tensor"(%g, 1, 0, sym(floordiv(seq, 2))) {plait.placements = #plait.placements<[shard(0), replicate, partial(sum), shard(2, blocks = [8, 4, 4])]>} : !plait.tensor<[batch, floordiv(seq, 2), 32], f32>
    func.return %f : !plait.tensor<[batch, floordiv(seq, 2), 32], f32>
  }
}
// -----
builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 8]>, plait.mesh = #plait.mesh<dp = 2, tp = 4>} {
  func.func @forward(%x : !plait.tensor<[n, 2*n, floordiv(n, 2) + 1, mod(n, 3), ceildiv(n, 4), max(n, 3)], bf16>) -> !plait.tensor<[4*n, n, 1], bf16> {
    %c = plait.param constant "lifted_tensor_0" {plait.quant = #plait.quant<method = "easyquant", bits = 4, group = 128, outlier_sigma = 3.0>, plait.sparsity = #plait.sparsity<group = 16, sparsity = 0.5>, plait.mem = #plait.mem<tier = "host", offset = 4096, prefetch = true>} : !plait.tensor<[], f32>
    %s = plait.call "aten::sum.dim_IntList"(%x, [2, 3, 4, 5], false, dtype = dtype(bf16)) : !plait.tensor<[n, 2*n], bf16> loc("model.pool")
    %g = plait.reduce_scatter %s {axis = "dp", dim = 1 : i64, reduce = "avg"} : !plait.tensor<[n, 2*n], bf16> -> !plait.tensor<[n, n], bf16>
    %u = plait.reshape "aten::unsqueeze"(%g, 2) : !plait.tensor<[n, n, 1], bf16>
    %e = plait.reshape "aten::expand"(%u, [sym(n), -1, 4]) : !plait.tensor<[n, n, 4], bf16>
    %a = plait.all_to_all %e {axis = "tp", split_dim = 2 : i64, concat_dim = 0 : i64} : !plait.tensor<[n, n, 4], bf16> -> !plait.tensor<[4*n, n, 1], bf16>
    %b = plait.elementwise "aten::ne.Scalar"(%a, 0) : !plait.tensor<[4*n, n, 1], i1>
    %f = plait.elementwise "aten::where.ScalarOther"(%b, %a, nan) : !plait.tensor<[4*n, n, 1], bf16>
    %h = plait.call "custom_ns::my_op.overload"(%f, "a \"quoted\" \n string", [], [[1, 2], [3]], memory_format = memory_format(contiguous_format), layout = layout(strided), big = 9223372036854775807, tiny = -1.5e-300) : !plait.tensor<[4*n, n, 1], bf16>
    func.return %h : !plait.tensor<[4*n, n, 1], bf16>
  }
}
